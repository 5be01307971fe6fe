"""COCO per-image matching and accumulation, as Detectron2's ``COCOeval_opt`` calls them.

``detectron2/evaluation/fast_eval_api.py`` replaces pycocotools'
``evaluateImg``/``accumulate`` by ``COCOevalEvaluateImages`` and
``COCOevalAccumulate``; these give the numbers of pycocotools' ``COCOeval``:
- detections are taken by decreasing score (stable, so ties keep their order),
  at most ``maxDets[-1]`` per image and category, and the IoU matrix rows follow
  that order, as ``COCOeval.computeIoU`` builds them;
- for each area range and IoU threshold, each detection in turn takes the
  available ground truth of highest IoU (at least the threshold, and the last
  one on ties), preferring ground truth that is not ignored; crowd ground truth
  stays available after a match; ground truth is ignored when flagged (crowd) or
  outside the area range, and so are the detections matched to it and the
  unmatched detections outside the area range;
- precision is made monotone from the right and read at the first point whose
  recall reaches each recall threshold (0 past the end); a category with no
  non-ignored ground truth keeps -1.
The greedy matching is sequential over detections; it is vectorised over area
ranges, IoU thresholds and ground truth.
"""
import datetime

import numpy as np


class InstanceAnnotation:
    """A ground-truth or detected instance, reduced to what the matching reads."""

    __slots__ = ("id", "score", "area", "is_crowd", "ignore")

    def __init__(self, id, score, area, is_crowd, ignore):
        self.id = int(id)
        self.score = float(score)
        self.area = float(area)
        self.is_crowd = bool(is_crowd)
        self.ignore = bool(ignore)


class ImageEvaluation:
    """Matching result of one image, category and area range, for all IoU thresholds.

    ``detection_matches`` (T, D) holds the matched ground-truth id, 0 when
    unmatched (an id of 0 reads as unmatched, as in pycocotools);
    ``detection_ignores`` is (T, D); ``detection_scores`` (D,) and
    ``ground_truth_ignores`` (G,) complete it.
    """

    __slots__ = (
        "detection_matches",
        "detection_ignores",
        "detection_scores",
        "ground_truth_ignores",
    )

    def __init__(self, detection_matches, detection_ignores, detection_scores, gt_ignores):
        self.detection_matches = detection_matches
        self.detection_ignores = detection_ignores
        self.detection_scores = detection_scores
        self.ground_truth_ignores = gt_ignores


def _evaluate_image(area_ranges, max_detections, iou_thresholds, ious, ground_truth, detections):
    """Match one image and category for all area ranges; one ImageEvaluation per range."""
    num_areas, num_thresholds = len(area_ranges), len(iou_thresholds)
    scores = np.array([d.score for d in detections], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")[:max_detections]
    det_ids = np.array([detections[k].id for k in order], dtype=np.int64)
    det_area = np.array([detections[k].area for k in order], dtype=np.float64)
    gt_ids = np.array([g.id for g in ground_truth], dtype=np.int64)
    gt_area = np.array([g.area for g in ground_truth], dtype=np.float64)
    gt_crowd = np.array([g.is_crowd for g in ground_truth], dtype=bool)
    gt_flag = np.array([g.ignore for g in ground_truth], dtype=bool)
    lo, hi = area_ranges[:, :1], area_ranges[:, 1:]
    num_dets, num_gts = len(order), len(ground_truth)

    gt_ignore = gt_flag[None, :] | (gt_area[None, :] < lo) | (gt_area[None, :] > hi)  # (A, G)
    gt_taken_by = np.zeros((num_areas, num_thresholds, num_gts), dtype=np.int64)
    det_match = np.zeros((num_areas, num_thresholds, num_dets), dtype=np.int64)
    det_ignore = np.zeros((num_areas, num_thresholds, num_dets), dtype=bool)
    if num_dets and num_gts:
        ious = np.asarray(ious, dtype=np.float64).reshape(num_dets, num_gts)
        thresholds = np.minimum(iou_thresholds, 1 - 1e-10)[None, :, None]
        ignored = gt_ignore[:, None, :]
        for d in range(num_dets):
            iou = ious[d]
            available = ((gt_taken_by == 0) | gt_crowd) & (iou >= thresholds)  # (A, T, G)
            regular = available & ~ignored
            candidates = np.where(regular.any(-1, keepdims=True), regular, available & ignored)
            found = candidates.any(-1)
            # Last ground truth of highest IoU, as the reference's ">=" scan picks it.
            masked = np.where(candidates, iou, -np.inf)[..., ::-1]
            best = num_gts - 1 - masked.argmax(-1)
            a, t = np.nonzero(found)
            g = best[a, t]
            gt_taken_by[a, t, g] = det_ids[d]
            det_match[a, t, d] = gt_ids[g]
            det_ignore[a, t, d] = gt_ignore[a, g]
    det_outside = (det_area[None, :] < lo) | (det_area[None, :] > hi)  # (A, D)
    det_ignore |= (det_match == 0) & det_outside[:, None, :]
    return [
        ImageEvaluation(det_match[a], det_ignore[a], scores[order], gt_ignore[a])
        for a in range(num_areas)
    ]


def COCOevalEvaluateImages(
    area_ranges, max_detections, iou_thresholds, ious, ground_truth, detections
):
    """Evaluations listed category-major, then area range, then image, the layout
    pycocotools' ``evalImgs`` and Detectron2's ``COCOevalAccumulate`` expect."""
    area_ranges = np.asarray(area_ranges, dtype=np.float64).reshape(-1, 2)
    iou_thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    num_images, num_areas = len(ground_truth), len(area_ranges)
    num_categories = len(ious[0]) if len(ious) else 0
    results = [None] * (num_categories * num_areas * num_images)
    for i in range(num_images):
        for c in range(num_categories):
            per_area = _evaluate_image(
                area_ranges,
                max_detections,
                iou_thresholds,
                ious[i][c],
                ground_truth[i][c],
                detections[i][c],
            )
            for a, evaluation in enumerate(per_area):
                results[(c * num_areas + a) * num_images + i] = evaluation
    return results


def _precision_recall(matches, ignores, scores, num_ground_truth, recall_thresholds):
    """Precision and score at each recall threshold, and the final recall, for
    detections already sorted by score; all per IoU threshold (rows)."""
    num_thresholds, num_dets = matches.shape
    if num_dets == 0:
        zeros = np.zeros((num_thresholds, len(recall_thresholds)))
        return zeros, zeros, np.zeros(num_thresholds)
    true_pos = np.cumsum((matches > 0) & ~ignores, axis=1)
    false_pos = np.cumsum((matches == 0) & ~ignores, axis=1)
    recall = true_pos / num_ground_truth
    counted = true_pos + false_pos
    precision = np.where(counted > 0, true_pos / np.maximum(counted, 1), 0.0)
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    precision_at = np.zeros((num_thresholds, len(recall_thresholds)))
    scores_at = np.zeros((num_thresholds, len(recall_thresholds)))
    for t in range(num_thresholds):
        index = np.searchsorted(recall[t], recall_thresholds, side="left")
        reached = index < num_dets
        precision_at[t, reached] = precision[t, index[reached]]
        scores_at[t, reached] = scores[index[reached]]
    return precision_at, scores_at, recall[:, -1]


def COCOevalAccumulate(params, evaluations):
    recall_thresholds = np.asarray(params.recThrs, dtype=np.float64)
    max_detections = [int(m) for m in params.maxDets]
    num_thresholds = len(params.iouThrs)
    num_recalls = len(recall_thresholds)
    num_categories = len(params.catIds) if params.useCats == 1 else 1
    num_areas = len(params.areaRng)
    num_max = len(max_detections)
    num_images = len(params.imgIds)
    counts = [num_thresholds, num_recalls, num_categories, num_areas, num_max]
    precision = -np.ones(counts)
    scores = -np.ones(counts)
    recall = -np.ones((num_thresholds, num_categories, num_areas, num_max))

    for c in range(num_categories):
        for a in range(num_areas):
            start = (c * num_areas + a) * num_images
            block = evaluations[start : start + num_images]
            num_ground_truth = sum(int(np.count_nonzero(~e.ground_truth_ignores)) for e in block)
            if num_ground_truth == 0:
                continue
            det_scores = np.concatenate([e.detection_scores for e in block])
            rank = np.concatenate([np.arange(len(e.detection_scores)) for e in block])
            matches = np.concatenate([e.detection_matches for e in block], axis=1)
            ignores = np.concatenate([e.detection_ignores for e in block], axis=1)
            for m, max_det in enumerate(max_detections):
                kept = np.nonzero(rank < max_det)[0]
                kept = kept[np.argsort(-det_scores[kept], kind="stable")]
                p, s, r = _precision_recall(
                    matches[:, kept],
                    ignores[:, kept],
                    det_scores[kept],
                    num_ground_truth,
                    recall_thresholds,
                )
                precision[:, :, c, a, m] = p
                scores[:, :, c, a, m] = s
                recall[:, c, a, m] = r

    return {
        "params": params,
        "counts": counts,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "precision": precision.ravel(),
        "recall": recall.ravel(),
        "scores": scores.ravel(),
    }
