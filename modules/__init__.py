"""Segmentation modules: the DeepLabV3 head and the incremental segmentation model (body, head, classifiers)."""
