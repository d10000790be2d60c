"""SegmentationMetrics against hand-computed confusion matrices, and its sum over a real 2-process gloo group."""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from utils.metrics import SegmentationMetrics, format_table

# 4 classes; one ignored pixel (predicted 3, must not count); class 3 has no ground truth.
TARGET = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 1]]])
PRED = torch.tensor([[[0, 1, 1, 1], [2, 0, 3, 1]]])
# rows = ground truth, columns = prediction, counted by hand from the pixel pairs above
EXPECTED_CONFUSION = [
    [1, 1, 0, 0],
    [0, 3, 0, 0],
    [1, 0, 1, 0],
    [0, 0, 0, 0],
]


def hand_metrics():
    metrics = SegmentationMetrics(4)
    metrics.update(PRED, TARGET)
    return metrics


def test_confusion_matrix_by_hand_with_ignore():
    metrics = hand_metrics()
    assert metrics.confusion.dtype == torch.int64
    assert metrics.confusion.tolist() == EXPECTED_CONFUSION


def test_logits_give_the_same_matrix_and_updates_accumulate():
    metrics = SegmentationMetrics(4)
    logits = torch.nn.functional.one_hot(PRED.clamp(max=3), 4).permute(0, 3, 1, 2).float()
    metrics.update(logits, TARGET)
    metrics.update(PRED, TARGET)
    assert metrics.confusion.tolist() == (2 * np.array(EXPECTED_CONFUSION)).tolist()


def test_matches_pixel_loop_reference_on_random_maps():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (2, 16, 16), generator=gen)
    target[target == 4] = 255
    pred = torch.randint(0, 4, (2, 16, 16), generator=gen)
    metrics = SegmentationMetrics(4)
    metrics.update(pred, target)
    reference = np.zeros((4, 4), dtype=np.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            reference[t, p] += 1
    assert metrics.confusion.numpy().tolist() == reference.tolist()


def test_results_old_new_all_by_hand():
    res = hand_metrics().results(old_classes=[0, 1], new_classes=[2, 3])
    # IoU = TP / (TP + FP + FN): c0 1/(1+1+1), c1 3/(3+1+0), c2 1/(1+0+1), c3 no ground truth
    assert res["iou"][:3] == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert res["iou"][3] is None
    assert res["acc"][:3] == pytest.approx([1 / 2, 1.0, 1 / 2])
    assert res["acc"][3] is None
    assert res["miou_old"] == pytest.approx(3 / 4)  # background excluded
    assert res["miou_new"] == pytest.approx(1 / 2)  # class 3 has no ground truth: left out of the mean
    assert res["miou_all"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert res["miou_all_bg"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert res["overall_acc"] == pytest.approx(5 / 7)
    assert res["mean_acc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert res["confusion"] == EXPECTED_CONFUSION


def test_results_step0_has_no_new_and_empty_means_are_none():
    res = hand_metrics().results(old_classes=[0, 1, 2], new_classes=[])
    assert res["miou_new"] is None
    assert res["miou_old"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    only_missing = hand_metrics().results(old_classes=[0, 1, 2], new_classes=[3])
    assert only_missing["miou_new"] is None  # the only new class has no ground truth


def test_out_of_range_labels_raise():
    metrics = SegmentationMetrics(3)
    with pytest.raises(ValueError):
        metrics.update(torch.tensor([[0, 1]]), torch.tensor([[0, 3]]))
    with pytest.raises(ValueError):
        metrics.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_format_table_shows_values_and_x():
    res = hand_metrics().results(old_classes=[0, 1], new_classes=[2, 3])
    table = format_table(res, ["clutter", "impervious", "building", "low_veg"])
    lines = {line.split("  ")[0].strip(): line for line in table.splitlines()}
    assert "75.00" in lines["impervious"] and "100.00" in lines["impervious"]
    assert lines["low_veg"].split()[1:] == ["x", "x", "x"]  # IoU, accuracy, F1
    assert lines["mIoU all"].split()[-1] == "62.50"
    assert lines["mIoU new"].split()[-1] == "50.00"


def _sync_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from utils import distributed

    info = distributed.init_distributed()
    try:
        assert info.distributed and info.backend == "gloo" and info.rank == rank and info.world_size == world_size
        metrics = SegmentationMetrics(4)
        # rank 0 sees the hand example, rank 1 sees only class-2 pixels predicted 3
        if rank == 0:
            metrics.update(PRED, TARGET)
        else:
            metrics.update(torch.full((1, 2, 3), 3), torch.full((1, 2, 3), 2))
        metrics.synchronize()
        token = distributed.broadcast_object({"from": distributed.get_rank()} if rank == 0 else None)
        distributed.barrier()
        torch.save({"confusion": metrics.confusion, "token": token}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.cleanup()


def test_synchronize_sums_over_two_gloo_processes(tmp_path, free_port):
    mp.spawn(_sync_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    expected = np.array(EXPECTED_CONFUSION)
    expected[2, 3] += 6
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["confusion"].tolist() == expected.tolist()
        assert out["token"] == {"from": 0}
