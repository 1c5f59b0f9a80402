"""What `MutualLearning` checks of the Keras models it is given, each refusal one sentence.

Peers are named as every log names them, "peer k" from 1, with the Python index beside it
("peer 2 (peers[1])"), so a message points both at the logs and at the user's list.
"""

import os

import keras
import tensorflow as tf

from dml_tf import cohort as cohort_lib
from dml_tf.errors import UserError


def _name(index):
    return f"peer {index + 1} (peers[{index}])"


def checked_peers(peers):
    """The peers as a list, refused in one sentence if they cannot be a cohort."""
    if isinstance(peers, keras.Model) or not isinstance(peers, (list, tuple)) or not peers:
        raise UserError("peers must be a non-empty list of keras.Model, one per peer.")
    shapes = []
    for index, peer in enumerate(peers):
        if not isinstance(peer, keras.Model):
            raise UserError(f"{_name(index)} is a {type(peer).__name__}, not a keras.Model.")
        shapes.append(cohort_lib.input_shape(peer, name=_name(index))[1:])
        if _ends_in_softmax(peer):
            raise UserError(f"{_name(index)} ends in a softmax, but peers must output logits; "
                            "remove the final softmax (its activation or layer; for a "
                            "keras.applications model pass classifier_activation=None).")
    if len(set(shapes)) > 1:
        raise UserError(f"peers must all take the same input shape, got {shapes}.")
    if len(set(map(id, peers))) != len(peers):
        raise UserError("peers must be distinct models; the same model appears twice.")
    _check_no_shared_weights(peers)
    return list(peers)


def _check_no_shared_weights(peers):
    """Two peers holding one variable would be stepped by two optimizers and decayed twice."""
    owner = {}
    for index, peer in enumerate(peers):
        for variable in peer.weights:
            first = owner.setdefault(id(variable), index)
            if first != index:
                raise UserError(f"{_name(first)} and {_name(index)} share the weight "
                                f"{variable.path!r}: each peer must have layers of its own "
                                "(build each peer from new layers).")


def _ends_in_softmax(peer):
    """Whether a functional or Sequential peer's last layer is a softmax (subclassed peers
    cannot be inspected)."""
    if not getattr(peer, "layers", None) or not _has_graph(peer):
        return False
    last = peer.layers[-1]
    return (isinstance(last, keras.layers.Softmax)
            or getattr(last, "activation", None) is keras.activations.softmax)


def _has_graph(peer):
    try:
        return bool(peer.outputs)
    except (AttributeError, ValueError):
        return False


def num_classes(peers):
    """M, the one width of the peers' [batch, M] logits; refused for any other output."""
    widths = []
    for index, peer in enumerate(peers):
        spec = peer.compute_output_spec(_input_spec(peer))
        if not isinstance(spec, keras.KerasTensor):
            count = len(tf.nest.flatten(spec))
            raise UserError(f"{_name(index)} has {count} outputs; a peer must map its inputs to "
                            "one [batch, classes] tensor of logits.")
        if len(spec.shape) != 2:
            raise UserError(f"{_name(index)} outputs shape {tuple(spec.shape)}; a peer must "
                            "output [batch, classes] logits (pool or flatten before the last "
                            "Dense).")
        widths.append(spec.shape[-1])
    if len(set(widths)) > 1:
        raise UserError(f"peers must all output the same number of classes, got {widths}.")
    return widths[0]


def _input_spec(peer):
    dtype = input_dtype(peer) or keras.config.floatx()
    return keras.KerasTensor(cohort_lib.input_shape(peer), dtype=dtype)


def input_dtype(peer):
    """The dtype a functional or Sequential peer declares for its input (None: undeclared)."""
    try:
        return peer.inputs[0].dtype
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def as_peer_input(inputs, peer):
    """One tensor of inputs in the dtype `peer` declares (an undeclared one: integers become
    floatx, as images do); structures (a dict of named inputs) are Keras' to convert."""
    if isinstance(inputs, (dict, list, tuple)):
        return inputs
    inputs = tf.convert_to_tensor(inputs)
    declared = input_dtype(peer)
    check_batch_axis(inputs, peer)
    target = declared or (inputs.dtype.name if inputs.dtype.is_floating else keras.config.floatx())
    return inputs if inputs.dtype == target else tf.cast(inputs, target)


def check_batch_axis(inputs, peer):
    """Refuses one example without its batch axis (shaped exactly like the peer's input)."""
    expected = cohort_lib.input_shape(peer)
    if tuple(inputs.shape) == tuple(expected[1:]):
        raise UserError(f"inputs of shape {tuple(inputs.shape)} have no batch axis (peers take "
                        f"{tuple(expected)}); pass a batch, e.g. x[None] or x[:1].")


def check_label_layout(labels, num_classes):
    """Refuses one-hot, non-integer and wrongly shaped labels (a [B] or [B, 1] tensor)."""
    shape = labels.shape
    if shape.rank == 2 and shape[-1] == num_classes and num_classes > 1:
        raise UserError(f"labels of shape {shape} look one-hot; pass class indices of shape "
                        "[B] instead (e.g. labels.argmax(-1)).")
    if not labels.dtype.is_integer:
        raise UserError(f"labels must be integer class indices (e.g. int32, int64, uint8), "
                        f"got {labels.dtype.name}.")
    if not (shape.rank == 1 or (shape.rank == 2 and shape[-1] == 1)):
        raise UserError(f"labels must have shape [B] or [B, 1], got {shape}.")


def load_teacher(model, index, teacher):
    """Copies a trained `teacher` (a keras.Model of `model`'s architecture, or the path of its
    weights file) into the frozen peer `model`."""
    if isinstance(teacher, keras.Model):
        got, want = [w.shape for w in teacher.weights], [w.shape for w in model.weights]
        if got != want:
            raise UserError(f"teacher does not have {_name(index)}'s architecture (its "
                            f"{len(got)} weights' shapes differ from the peer's {len(want)}); "
                            "pass a trained model built like that peer.")
        model.set_weights(teacher.get_weights())
        return
    if not isinstance(teacher, (str, os.PathLike)) or not os.path.isfile(teacher):
        raise UserError(f"teacher={teacher!r} is neither a keras.Model nor an existing weights "
                        "file; pass the trained teacher model or its .weights.h5 path.")
    try:
        model.load_weights(teacher)
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"teacher={os.fspath(teacher)} does not hold weights of "
                        f"{_name(index)}'s architecture ({str(e).splitlines()[0][:160]}); pass "
                        "the weights of a trained model built like that peer.") from None
