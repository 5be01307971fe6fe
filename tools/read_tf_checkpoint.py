#!/usr/bin/env python3
"""The TensorFlow side of ``tools/convert_tf_checkpoint.py``; runs in ``.venv-tf``.

Reads a TF Model Garden deepmac_maskrcnn checkpoint (a ``tf.train.Checkpoint``
directory or prefix, or a SavedModel directory) for the model that a spec describes
(``deepmac_d2.tf_port.checkpoint.reference_spec`` writes it from a Detectron2 config)
and writes, for the backbone (with a ResNet, also its FPN decoder) and the mask head,
the variables the reference model has in creation order (the order ``deepmac_d2.tf_port`` pairs with our layers)
together with the checkpoint's value under each one's key, where it has one. Checking
that they fit is left to the torch side, which knows the config keys to name.

A checkpoint stores each variable under one path of its object graph
(``backbone/layer_with_weights-3/kernel/...``; a SavedModel may use another, such as
``model/backbone/variables/12``), not under its name, and keeps no creation order. So
the spec's model is built here once, each of its variables is set to its own creation
index, and a checkpoint of that model is written and read back: the value under each
key gives the index, the key's place in the object graph the path from the component
(backbone, mask head) to the variable. The same path is then followed in the given
checkpoint's object graph, as TensorFlow's own restore does.

    .venv-tf/bin/python tools/read_tf_checkpoint.py --checkpoint CKPT --spec spec.json --out vars.npz

It imports nothing from deepmac_d2 (which needs torch and Detectron2).
"""
import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf_reference"))
from parity_tf import creation_order  # noqa: E402  (tools/tf_reference/)



def components(spec):
    """The parts whose weights deepmac-d2 ports: a SpineNet has no decoder (the reference's
    'identity'), a ResNet its FPN; the RPN and box head where the spec names them (the
    config has the reference's own heads)."""
    parts = ("backbone", "decoder") if "resnet" in spec else ("backbone",)
    return parts + ("mask_head",) + tuple(p for p in ("rpn_head", "detection_head") if p in spec)


def reference_params(spec):
    """The Model Garden experiment config of the model ``spec`` describes: its SpineNet
    experiment (identity decoder) or its ResNet-FPN one, with the spec's backbone and
    mask head."""
    from official.core import exp_factory
    from official.projects.deepmac_maskrcnn.configs import deep_mask_head_rcnn  # noqa: F401 (registers)

    if "resnet" in spec:
        params = exp_factory.get_exp_config("deep_mask_head_rcnn_resnetfpn_coco")
        model = params.task.model
        model.backbone.resnet.model_id = spec["resnet"]["model_id"]
        model.decoder.fpn.num_filters = spec["fpn"]["num_filters"]
    else:
        params = exp_factory.get_exp_config("deep_mask_head_rcnn_spinenet_coco")
        model = params.task.model
        for key in ("model_id", "min_level", "max_level"):
            setattr(model.backbone.spinenet, key, spec["spinenet"][key])
    model.min_level, model.max_level = spec["min_level"], spec["max_level"]
    model.num_classes = spec["num_classes"]
    size = spec.get("input_size", 2 ** (spec["max_level"] + 1))
    model.input_size = [size, size, 3]
    head = spec["mask_head"]
    for key in ("convnet_variant", "num_filters", "num_convs", "upsample_factor", "class_agnostic"):
        setattr(model.mask_head, key, head[key])
    model.mask_roi_aligner.crop_size = spec["crop_size"]
    for part in ("rpn_head", "detection_head", "anchor"):
        for key, value in spec.get(part, {}).items():
            setattr(getattr(model, part), key, value)
    if "box_crop_size" in spec:
        model.roi_aligner.crop_size = spec["box_crop_size"]
    # float32 on CPU here; the released recipes train in bf16 with float32 variables.
    params.runtime.mixed_precision_dtype = "float32"
    return params


def build_reference(params):
    """The reference's DeepMaskRCNNModel, every variable built, as its trainer builds it."""
    from official.projects.deepmac_maskrcnn.tasks import deep_mask_head_rcnn

    return deep_mask_head_rcnn.DeepMaskHeadRCNNTask(params.task).build_model()


def object_graph(reader):
    """The checkpoint's object graph: nodes with named children and saved attributes."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    return graph


def find(graph, name):
    """(node id, path) of the object nearest the root reached by an edge named ``name``:
    ``backbone`` at the root in the trainer's checkpoints (which also track the model's
    parts there), ``model/backbone`` in a SavedModel or an exporter's checkpoint."""
    queue, seen = [(0, "")], {0}
    while queue:
        node, path = queue.pop(0)
        for child in graph.nodes[node].children:
            if child.local_name == name:
                return child.node_id, path + name
            if child.node_id not in seen:
                seen.add(child.node_id)
                queue.append((child.node_id, f"{path}{child.local_name}/"))
    return None, None


def variable_paths(graph, node):
    """{checkpoint key: path of child names from ``node``} for every variable below it.
    A variable can be reached by several paths (a SavedModel also lists a layer's
    ``variables``); the first found, breadth first, is kept."""
    paths, queue, seen = {}, [(node, ())], {node}
    while queue:
        node, path = queue.pop(0)
        for attribute in graph.nodes[node].attributes:
            if attribute.name == "VARIABLE_VALUE":
                paths.setdefault(attribute.checkpoint_key, path)
        for child in graph.nodes[node].children:
            if child.node_id not in seen:
                seen.add(child.node_id)
                queue.append((child.node_id, path + (child.local_name,)))
    return paths


def resolve(graph, node, path):
    """The checkpoint key of the variable at ``path`` below ``node``, or None."""
    for name in path:
        node = next((c.node_id for c in graph.nodes[node].children if c.local_name == name), None)
        if node is None:
            return None
    return next((a.checkpoint_key for a in graph.nodes[node].attributes if a.name == "VARIABLE_VALUE"), None)


def component_paths(model, component):
    """[(variable, its path below the component)] in creation order."""
    module = getattr(model, component)
    if module is None:
        return []
    variables = creation_order(module.weights)
    saved = [v.numpy() for v in variables]
    for i, v in enumerate(variables):
        v.assign(tf.fill(v.shape, tf.cast(i, v.dtype)))
    with tempfile.TemporaryDirectory() as tmp:
        reader = tf.train.load_checkpoint(
            tf.train.Checkpoint(**{component: module}).write(os.path.join(tmp, "markers")))
        graph = object_graph(reader)
        node, _ = find(graph, component)
        paths = {int(np.ravel(reader.get_tensor(key))[0]): path
                 for key, path in variable_paths(graph, node).items()}
    for v, value in zip(variables, saved):
        v.assign(value)
    if sorted(paths) != list(range(len(variables))):
        raise RuntimeError(f"{component}: could not find every variable in the object graph")
    return [(v, paths[i]) for i, v in enumerate(variables)]


def checkpoint_path(path):
    """The checkpoint prefix inside a SavedModel, a checkpoint directory, or ``path``."""
    if os.path.isdir(path):
        if tf.saved_model.contains_saved_model(path):
            return os.path.join(path, "variables", "variables")
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            sys.exit(f"{path}: neither a SavedModel nor a directory with a 'checkpoint' file")
        return latest
    return path


def reference_config(checkpoint):
    """(path, ``task.model`` dict) of the ``params.yaml`` next to the checkpoint, where
    there is one: the reference's exporter writes it beside ``saved_model/``, its
    trainer into the checkpoint directory. None when there is none."""
    import yaml

    here = os.path.abspath(checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint))
    for folder in (here, os.path.dirname(here)):
        path = os.path.join(folder, "params.yaml")
        if os.path.exists(path):
            with open(path) as f:
                return path, yaml.safe_load(f)["task"]["model"]
    return None


def read(checkpoint, spec):
    """The record ``tools/convert_tf_checkpoint.py`` reads: a manifest and the arrays."""
    model = build_reference(reference_params(spec))
    reader = tf.train.load_checkpoint(checkpoint_path(checkpoint))
    shapes = reader.get_variable_to_shape_map()
    graph = object_graph(reader)
    manifest = {"checkpoint": checkpoint, "components": {}, "params": reference_config(checkpoint)}
    arrays = {}
    for component in components(spec):
        node, where = find(graph, component)
        expected = []
        for i, (v, path) in enumerate(component_paths(model, component)):
            key = None if node is None else resolve(graph, node, path)
            expected.append({"name": v.name, "key": key or "/".join((where or component,) + path),
                             "shape": list(v.shape), "found": list(shapes[key]) if key else None})
            if key:
                arrays[f"{component}|{i:05d}"] = reader.get_tensor(key)
        used = {e["key"] for e in expected}
        below = variable_paths(graph, node) if node is not None else {}
        unused = sorted(k for k in below if k not in used)
        manifest["components"][component] = {"path": where, "variables": expected, "unused": unused}
    return manifest, arrays


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="SavedModel dir, checkpoint dir or prefix")
    ap.add_argument("--spec", required=True, help="JSON file (deepmac_d2.tf_port.checkpoint.reference_spec)")
    ap.add_argument("--out", required=True, help=".npz to write")
    args = ap.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    manifest, arrays = read(args.checkpoint, spec)
    np.savez(args.out, manifest=np.array(json.dumps(manifest)), **arrays)


if __name__ == "__main__":
    main()
