"""Every config key deepmac-d2 adds to Detectron2, with its default.

Keys live under the node where Detectron2 users look for them (the mask head's
under ``MODEL.ROI_MASK_HEAD``); new nodes only for new concepts (``DEEPMAC``
for the launcher, ``DATASETS.EVAL_CLASS_SUBSETS`` for subset evaluation).
The TF Model Garden name of each key is given where there is one.
"""
from detectron2.config import CfgNode as CN


def add_deepmac_config(cfg):
    """Add deepmac-d2's keys to ``cfg`` (a Detectron2 CfgNode), in place."""
    head = cfg.MODEL.ROI_MASK_HEAD
    # Mask-head network: "default" (NUM_CONV 3x3 convs) or "hourglass10/20/32/52/100".
    # TF: task.model.mask_head.convnet_variant. CONV_DIM is TF's num_filters.
    head.CONVNET_VARIANT = "default"
    # Kernel and stride of the transposed conv after the network; the mask is
    # POOLER_RESOLUTION * UPSAMPLE_FACTOR wide. TF: mask_head.upsample_factor.
    head.UPSAMPLE_FACTOR = 2
    # The reference's mask head uses BatchNorm; Detectron2's default is "" (none).
    # "" still means no norm; "SyncBN", "GN", "FrozenBN" are accepted too.
    head.NORM = "BN"
    # Train the mask branch on ground-truth boxes instead of sampled foreground
    # proposals (the paper's "GT boxes"); needs ROI_HEADS.NAME "DeepMaskROIHeads".
    # TF: task.model.use_gt_boxes_for_masks.
    head.USE_GT_BOXES = False
    # Dataset category ids (as in the COCO json) whose instances train the mask
    # head; empty = all classes. Entries may also be the COCO presets "voc" (20
    # classes) and "nonvoc" (60), e.g. ["voc"]. Mapped to class indices through the
    # first DATASETS.TRAIN dataset; needs ROI_HEADS.NAME "DeepMaskROIHeads".
    # TF: task.allowed_mask_class_ids (COCO ids).
    head.ALLOWED_CLASS_IDS = []

    # The reference's training resize: fit INPUT.FIXED_SIZE x FIXED_SIZE times a random
    # factor in SCALE_JITTER = (min, max), then crop/pad to that square (Detectron2's
    # ResizeScale + FixedSizeCrop). Empty = Detectron2's ResizeShortestEdge (MIN_SIZE_TRAIN).
    # TF: parser.aug_scale_min / aug_scale_max, output_size.
    cfg.INPUT.SCALE_JITTER = ()
    cfg.INPUT.FIXED_SIZE = 1024

    # The mask head's own BatchNorms (default variant's convs, the deconv), PyTorch
    # momentum (1 - Keras'): the reference's norm_activation, Keras 0.99 / 1e-3 in the
    # SpineNet rows, 0.997 / 1e-4 in the R50/R101 rows (set in the configs).
    head.BN_MOMENTUM = 0.01
    head.BN_EPS = 1e-3
    # Mask targets: False = Detectron2's (each GT polygon/bitmask rasterised in its box,
    # binarised at 0.5); True = the reference's soft targets (bilinear crop-and-resize
    # of the full mask, values in [0, 1], never re-binarised).
    head.SOFT_TARGETS = False

    # Weak mask losses (deepmac_d2/modeling/weak_losses.py; docs/weak_losses.md): what an
    # instance's box alone teaches the mask head. Off while both weights are 0.
    head.WEAK = CN()
    # BoxInst's projection term / TF-OD DeepMAC's box consistency: the mask's max along
    # x and along y against the box's. Weight >= 0; loss "dice" (BoxInst) or "bce" (TF-OD).
    head.WEAK.BOX_PROJECTION_WEIGHT = 0.0
    head.WEAK.BOX_PROJECTION_LOSS = "dice"
    # BoxInst's pairwise term / TF-OD's colour consistency: -log P(same label) of each
    # in-box pixel and its 8 neighbours at PAIRWISE_DILATION (>= 1) whose LAB colour
    # similarity exp(-||dLAB|| / 2) is >= PAIRWISE_COLOR_THRESHOLD, in (0, 1) (BoxInst
    # 0.3, TF-OD 0.4). Weight >= 0.
    head.WEAK.PAIRWISE_WEIGHT = 0.0
    head.WEAK.PAIRWISE_COLOR_THRESHOLD = 0.3
    head.WEAK.PAIRWISE_DILATION = 2
    # The pairwise term is scaled by min(iteration / WARMUP_ITERS, 1) (BoxInst: 10000;
    # 0: no warmup), as early masks are noise and their pairs would teach noise.
    head.WEAK.WARMUP_ITERS = 10000
    # The ROI of a weakly supervised instance is its box (or proposal) scaled by this
    # (>= 1) about its centre: a ROI equal to the box makes the box target all ones.
    head.WEAK.ROI_EXPAND = 1.5
    # Which instances the weak losses cover: "no_mask" (those the mask loss does not
    # take: box-only, or of a class outside ALLOWED_CLASS_IDS) or "all".
    head.WEAK.APPLY_TO = "no_mask"

    # SpineNet backbone (MODEL.BACKBONE.NAME "build_spinenet_backbone"); TF Model
    # Garden's backbone.spinenet. Outputs p{MIN_LEVEL}..p{MAX_LEVEL}, strides 2^level.
    cfg.MODEL.SPINENET = CN()
    # 49, 96, 143 or 190: the reference's model_id (an int, as yacs reads "143" as one;
    # "49S" and "143L" are built from Python: SpineNet("143L")).
    cfg.MODEL.SPINENET.MODEL_ID = 49
    cfg.MODEL.SPINENET.MIN_LEVEL = 3
    cfg.MODEL.SPINENET.MAX_LEVEL = 7
    # Block i of 16 drops its residual branches (per sample, training only) with
    # rate x (i + 1) / 16. TF: backbone.spinenet.stochastic_depth_drop_rate.
    cfg.MODEL.SPINENET.STOCHASTIC_DEPTH_RATE = 0.0
    # The reference's synchronised BatchNorm; plain BN in a single process.
    cfg.MODEL.SPINENET.NORM = "SyncBN"
    # PyTorch momentum (Keras 0.99) and eps: TF norm_activation.norm_momentum/epsilon.
    cfg.MODEL.SPINENET.BN_MOMENTUM = 0.01
    cfg.MODEL.SPINENET.BN_EPS = 1e-3

    # The reference's ResNet-FPN (MODEL.BACKBONE.NAME "build_tf_resnet_fpn_backbone";
    # TF backbone.resnet + decoder.fpn), from Detectron2's keys where they mean the same:
    # RESNETS.DEPTH (TF resnet.model_id), RESNETS.NORM (its BatchNorm; "SyncBN" as the
    # reference), FPN.OUT_CHANNELS (TF fpn.num_filters), FPN.NORM (the norm after each
    # FPN level; "SyncBN" as the reference), FPN.FUSE_TYPE ("sum"), BACKBONE.FREEZE_AT.
    # New: the BatchNorms' PyTorch momentum (1 - Keras') and eps, for the ResNet and the
    # FPN alike (TF norm_activation.norm_momentum / norm_epsilon: 0.997 / 1e-4 in its
    # R50/R101 rows); Detectron2's ResNet-FPN ignores them.
    cfg.MODEL.RESNETS.BN_MOMENTUM = 0.003
    cfg.MODEL.RESNETS.BN_EPS = 1e-4
    # Its output levels p{MIN_LEVEL}..p{MAX_LEVEL}, strides 2^level (TF task.model.min_level
    # / max_level: 2 and 6); levels above the ResNet's 5 are strided convs of P5.
    cfg.MODEL.FPN.MIN_LEVEL = 2
    cfg.MODEL.FPN.MAX_LEVEL = 6

    # The reference's RPN head (MODEL.RPN.HEAD_NAME "TFRPNHead"): the BatchNorm after its
    # shared conv, one per level (Detectron2's StandardRPNHead has none); PyTorch momentum
    # (1 - Keras') and eps: TF norm_activation, 0.997 / 1e-4 in the R50/R101 rows.
    cfg.MODEL.RPN.NORM = "SyncBN"
    cfg.MODEL.RPN.BN_MOMENTUM = 0.003
    cfg.MODEL.RPN.BN_EPS = 1e-4
    # The same for the reference's box head (ROI_BOX_HEAD.NAME "TFConvFCHead", its
    # BatchNorms after every conv and FC; kind: ROI_BOX_HEAD.NORM).
    cfg.MODEL.ROI_BOX_HEAD.BN_MOMENTUM = 0.003
    cfg.MODEL.ROI_BOX_HEAD.BN_EPS = 1e-4

    # Named class subsets to report AP on, besides all classes, as "segm/<name>" etc.:
    # each entry is a preset ("voc", "nonvoc") or "name:id1,id2,..." with dataset
    # category ids, e.g. ["nonvoc", "seen:1,2,3"]. Used by build_subset_evaluator.
    # Class names of the first DATASETS.TEST dataset work too ("seen:cat,dog"), as in
    # ALLOWED_CLASS_IDS (of the first DATASETS.TRAIN one): setup() makes them ids.
    cfg.DATASETS.EVAL_CLASS_SUBSETS = []
    # COCO-format datasets that setup() registers (register_coco_instances), for
    # DATASETS.TRAIN / TEST to name: "NAME=JSON:IMAGE_DIR" strings, e.g.
    # ["mine_train=data/train.json:data/images"]. train_net.py's --dataset appends here.
    cfg.DATASETS.COCO_FILES = []

    # Standard speed-ups, off by default (docs/performance.md has what each gains):
    # torch.compile of "none" or "mask_head" (the ROI mask head's network), with a
    # torch.compile backend; dynamic shapes, as the ROI count changes every batch.
    cfg.MODEL.COMPILE = CN()
    cfg.MODEL.COMPILE.TARGET = "none"
    cfg.MODEL.COMPILE.BACKEND = "inductor"
    cfg.MODEL.COMPILE.DYNAMIC = True
    # Evaluation on a copy of the model whose BatchNorms are folded into the convs before
    # them (deepmac_d2.modeling.fuse_for_inference): "none" or "conv_bn".
    cfg.TEST.FUSE = "none"

    cfg.DEEPMAC = CN()
    # Where to train: "auto" (CUDA if present, else CPU), "cuda", "cpu" or "xla" (TPU via torch-xla).
    cfg.DEEPMAC.ACCELERATOR = "auto"
    # Iterations between progress lines (losses, lr, ETA) and metrics.json rows;
    # Detectron2 hard-codes 20.
    cfg.DEEPMAC.LOG_PERIOD = 20
    # bf16 autocast on XLA, as the reference trains in bf16 on TPU.
    cfg.DEEPMAC.XLA_BF16 = True
