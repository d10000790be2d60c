"""FT and the MiB family of baselines: each is a set of presets over the options of `Method`."""
from methods.base import Method


class FT(Method):
    name = "FT"
    summary = "fine-tuning: cross-entropy on the current step's labels only"
    paper = "-"


class LWF(Method):
    name = "LWF"
    summary = "knowledge distillation on the old classes' outputs"
    paper = "Li & Hoiem, Learning without Forgetting, TPAMI 2017"
    presets = {"loss_kd": 100.0}


class LWFMC(Method):
    name = "LWF-MC"
    summary = "sigmoid (BCE) classifier + iCaRL distillation of old outputs"
    paper = "Rebuffi et al., iCaRL, CVPR 2017"
    presets = {"icarl": True, "icarl_importance": 10.0}


class ILT(Method):
    name = "ILT"
    summary = "KD on outputs + L2 distillation of backbone features"
    paper = "Michieli & Zanuttigh, Incremental Learning Techniques for Semantic Segmentation, ICCVW 2019"
    presets = {"loss_kd": 100.0, "loss_de": 100.0}


class EWC(Method):
    name = "EWC"
    summary = "Fisher-weighted quadratic penalty on old parameters"
    paper = "Kirkpatrick et al., Overcoming catastrophic forgetting, PNAS 2017"
    presets = {"regularizer": "ewc", "reg_importance": 500.0}


class RW(Method):
    name = "RW"
    summary = "Riemannian Walk: Fisher + path-score penalty"
    paper = "Chaudhry et al., Riemannian Walk, ECCV 2018"
    presets = {"regularizer": "rw", "reg_importance": 100.0}


class PI(Method):
    name = "PI"
    summary = "Path Integral (synaptic intelligence) penalty"
    paper = "Zenke et al., Continual Learning Through Synaptic Intelligence, ICML 2017"
    presets = {"regularizer": "pi", "reg_importance": 500.0}


class MiB(Method):
    name = "MiB"
    summary = "unbiased CE + unbiased KD + balanced classifier initialisation"
    paper = "Cermelli et al., Modeling the Background, CVPR 2020"
    presets = {"loss_kd": 10.0, "unce": True, "unkd": True, "init_balanced": True}


class UFT(Method):
    name = "UFT"
    summary = "unbiased cross-entropy alone (MiB's UnCE without distillation); MiB-CD's UFT baseline"
    paper = "Cermelli et al., CVPR 2020 (UnCE); compared as UFT in Arnaudo et al., ICIAP 2021"
    presets = {"unce": True}


class MiBEWF(MiB):
    name = "MiB+EWF"
    summary = "MiB + endpoints weight fusion after each step, old classifiers frozen (--ewf)"
    paper = "Xiao et al., Endpoints Weight Fusion for Class Incremental Semantic Segmentation, CVPR 2023"
    presets = {**MiB.presets, "ewf": True}
