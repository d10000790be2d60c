"""Confusion-matrix segmentation metrics with the old / new / all summary of CISS papers."""
from __future__ import annotations

import torch

from utils import distributed


class SegmentationMetrics:
    """Accumulates a confusion matrix (rows = ground truth, columns = prediction) on `device`.

    Call `update` per batch, `synchronize` once after the last batch (sums over ranks), then `results`.
    prediction_classes (default num_classes): a model may predict channels beyond the seen classes
    (classifiers allocated for future steps, DFT*); such a prediction is a miss of the pixel's class
    (counted in `unseen_predictions`, per ground-truth class) and a false positive of no seen class.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device="cpu", prediction_classes=None):
        self.num_classes = int(num_classes)
        self.prediction_classes = max(int(prediction_classes or num_classes), self.num_classes)
        self.ignore_index = ignore_index
        self.device = torch.device(device)
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self.device)
        self.unseen_predictions = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred: class indices [B,H,W] or logits [B,C,H,W] (C <= num_classes); target: labels [B,H,W]."""
        if pred.dim() == target.dim() + 1:
            if pred.shape[1] > self.prediction_classes:
                raise ValueError(f"logits have {pred.shape[1]} channels but the metric has {self.num_classes} classes")
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
        pred = pred.to(self.device, torch.int64).flatten()
        target = target.to(self.device, torch.int64).flatten()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        n = self.num_classes
        # One check (one device sync) per batch: a label outside [0, n) would land in a wrong cell silently.
        if ((target < 0) | (target >= n) | (pred < 0) | (pred >= self.prediction_classes)).any():
            raise ValueError(f"labels or predictions outside [0, {n}) that are not ignore_index={self.ignore_index}")
        if self.prediction_classes > n:
            unseen = pred >= n
            self.unseen_predictions += torch.bincount(target[unseen], minlength=n)
            pred, target = pred[~unseen], target[~unseen]
        self.confusion += torch.bincount(target * n + pred, minlength=n * n).view(n, n)

    def synchronize(self) -> None:
        """Sum the matrices of all ranks (no-op without a process group). Call exactly once."""
        distributed.all_reduce_sum(self.confusion)
        if self.prediction_classes > self.num_classes:
            distributed.all_reduce_sum(self.unseen_predictions)

    def results(self, old_classes, new_classes, background: int = 0) -> dict:
        """Metrics as fractions in [0, 1]; None where undefined (no ground truth / no new classes).

        old_classes: the channels of step 0 (background included); new_classes: those added at steps 1..t.
        Per class: iou, acc, f1 (lists over channels). Summaries: miou_old/new/all and f1_macro over
        foreground channels (background excluded), miou_all_bg and mean_acc with background,
        overall_acc = f1_micro (pixel accuracy).
        """
        conf = self.confusion.double().cpu()
        true_pos = conf.diag()
        unseen = self.unseen_predictions.double().cpu()
        gt_count = conf.sum(dim=1) + unseen
        pred_count = conf.sum(dim=0)
        has_gt = gt_count > 0
        iou = torch.where(has_gt, true_pos / (gt_count + pred_count - true_pos).clamp(min=1), torch.nan)
        acc = torch.where(has_gt, true_pos / gt_count.clamp(min=1), torch.nan)
        # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (ground truth + predicted)
        f1 = torch.where(has_gt, 2 * true_pos / (gt_count + pred_count).clamp(min=1), torch.nan)

        old = [c for c in old_classes if c != background]
        new = [c for c in new_classes if c != background]
        seen = sorted(set(old_classes) | set(new_classes))
        total = conf.sum() + unseen.sum()
        extra = {"unseen_predictions": self.unseen_predictions.cpu().tolist()} \
            if self.prediction_classes > self.num_classes else {}
        return {
            "iou": _to_list(iou),
            "acc": _to_list(acc),
            "miou_old": _nanmean(iou, old),
            "miou_new": _nanmean(iou, new) if new else None,
            "miou_all": _nanmean(iou, old + new),
            "miou_all_bg": _nanmean(iou, seen),
            "overall_acc": float(true_pos.sum() / total) if total > 0 else None,
            "mean_acc": _nanmean(acc, seen),
            "f1": _to_list(f1),
            # micro F1 over all classes = pixel accuracy (every wrong pixel is one FP and one FN)
            "f1_micro": float(true_pos.sum() / total) if total > 0 else None,
            "f1_macro": _nanmean(f1, old + new),  # seen foreground classes, as mIoU all
            "confusion": self.confusion.cpu().tolist(),
            **extra,
        }


def _to_list(values: torch.Tensor) -> list:
    return [None if v != v else v for v in values.tolist()]  # NaN -> None


def _nanmean(values: torch.Tensor, classes) -> float | None:
    """Mean over `classes` that have a value (ground truth); None when none has."""
    if not classes:
        return None
    picked = values[list(classes)]
    picked = picked[~picked.isnan()]
    return float(picked.mean()) if picked.numel() else None


def _percent(value) -> str:
    return "x" if value is None else f"{100 * value:.2f}"


def format_table(results: dict, class_names) -> str:
    """Readable per-class IoU / accuracy / F1 table plus the old / new / all summary and F1 micro / macro
    (percent, `x` = undefined)."""
    names = [class_names[c] if c < len(class_names) else str(c) for c in range(len(results["iou"]))]
    width = max([len(n) for n in names] + [len("mIoU all+bg")])
    f1 = results.get("f1") or [None] * len(names)
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}  {'F1':>6}"]
    lines += [f"{n:<{width}}  {_percent(i):>6}  {_percent(a):>6}  {_percent(f):>6}"
              for n, i, a, f in zip(names, results["iou"], results["acc"], f1)]
    lines.append("-" * (width + 24))
    summary = [
        ("mIoU old", "miou_old"),
        ("mIoU new", "miou_new"),
        ("mIoU all", "miou_all"),
        ("mIoU all+bg", "miou_all_bg"),
        ("overall acc", "overall_acc"),
        ("mean acc", "mean_acc"),
        ("F1 micro", "f1_micro"),
        ("F1 macro", "f1_macro"),
    ]
    lines += [f"{label:<{width}}  {_percent(results.get(key)):>6}" for label, key in summary]
    return "\n".join(lines)
