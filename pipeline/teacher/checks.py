"""What stage 1 checks in the driver before any Ray work: each teacher has the modules its taps name,
its weights fit its factory, and it takes one row of the source and predicts its classes.

The teacher is built on PyTorch's meta device: shapes and dtypes without memory or compute, so a
large teacher costs nothing here. A factory that cannot be built on the meta device is skipped
(its actors still name the failing row).
"""

from __future__ import annotations

import io

import torch

from pipeline import storage
from pipeline.config import ModelSpec, PrecomputeConfig
from pipeline.data.sources import SourceInfo
from pipeline.errors import DistillError
from pipeline.models.factory import build_model
from pipeline.models.taps import find_modules

REAL_CHECK_MAX_PARAMS = 50_000_000  # a teacher up to this size may be built on CPU for the one-row check


def check_teachers(cfg: PrecomputeConfig, source: SourceInfo) -> None:
    """Each teacher's tap modules exist, its weights fit its factory, and it takes one row of the source."""
    for name, spec in cfg.all_teachers.items():
        if spec.factory.endswith(":hf_causal_lm"):
            continue  # loaded by from_pretrained, which checks its own files; the actor checks the vocabulary
        owner = f"teacher {name!r} ({spec.factory})"
        taps = [t.module for t in cfg.outputs.taps if t.teacher == name]
        try:
            with torch.device("meta"):
                model = build_model(spec, input_shape=source.input_shape, num_classes=source.num_classes, load_weights=False)
        except DistillError:
            raise
        except Exception:  # noqa: BLE001 (a factory that needs real tensors to be built: only its tap names are checked)
            if taps:
                find_modules(build_model(spec, input_shape=source.input_shape, num_classes=source.num_classes,
                                         load_weights=False), taps, owner=owner)
            continue
        find_modules(model, taps, owner=owner)  # an unknown tap module lists the names that exist
        if spec.weights:
            state = torch.load(io.BytesIO(storage.read_bytes(spec.weights, cfg.storage)), map_location="meta", weights_only=True)
            try:
                model.load_state_dict(state, assign=True)
            except RuntimeError as e:
                classes = _classes_in_weights(model, state, source.num_classes)
                if classes is not None:
                    raise _labels_error(source, f"{owner} with weights {spec.weights}", classes) from None
                detail = " ".join(line.strip() for line in str(e).splitlines()[1:3]) or str(e)
                raise DistillError(f"the weights {spec.weights} do not fit {owner}: {detail}",
                                   "check the factory's kwargs against the weights (or the weights against the config)") from None
        _check_one_row(model, spec, source, owner, cfg.storage)


def _check_one_row(model: torch.nn.Module, spec: ModelSpec, source: SourceInfo, owner: str,
                   options: storage.Options = None) -> None:
    """One row of zeros through the teacher on the meta device. A forward that needs real values
    (data-dependent branches) is run for real on CPU when the teacher is small enough to build here."""
    dtype = torch.long if source.kind == "text" else torch.float32
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, *source.input_shape, dtype=dtype, device="meta"))
    except Exception:  # noqa: BLE001
        if sum(p.numel() for p in model.parameters()) > REAL_CHECK_MAX_PARAMS:
            return  # not checkable cheaply: the actors name the failing row
        real = build_model(spec, input_shape=source.input_shape, num_classes=source.num_classes, options=options)
        try:
            with torch.no_grad():
                out = real.eval()(torch.zeros(1, *source.input_shape, dtype=dtype))
        except Exception as e:  # noqa: BLE001 (any failure here is the user's model meeting the user's data)
            raise DistillError(f"{owner} cannot take one row of the source, shape {list(source.input_shape)}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0]}",
                               "fix `source.input_shape` (or the input columns), or the teacher's kwargs") from None
    out = out.logits if hasattr(out, "logits") else out
    if isinstance(out, torch.Tensor) and out.shape[-1] < source.num_classes and source.kind != "text":
        raise _labels_error(source, owner, int(out.shape[-1]))
    if isinstance(out, torch.Tensor) and out.shape[-1] != source.num_classes:
        raise DistillError(f"{owner} predicts {out.shape[-1]} classes, the source has {source.num_classes}",
                           f"build the teacher with num_classes={source.num_classes}, or check `source.label_column`")


def _classes_in_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], num_classes: int) -> int | None:
    """The class count of weights that fail to load only because the model was built for more classes
    (labels past the teacher's): every mismatched tensor differs in one dimension, num_classes in the
    model and fewer in the weights. None for any other mismatch."""
    own = model.state_dict()
    found = set()
    for key, value in state.items():
        if key not in own or tuple(own[key].shape) == tuple(value.shape):
            continue
        mine, theirs = tuple(own[key].shape), tuple(value.shape)
        diff = [i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b] if len(mine) == len(theirs) else []
        if len(diff) != 1 or mine[diff[0]] != num_classes or theirs[diff[0]] >= num_classes:
            return None
        found.add(theirs[diff[0]])
    return found.pop() if len(found) == 1 else None


def _labels_error(source: SourceInfo, who: str, classes: int) -> DistillError:
    return DistillError(f"the source's labels go up to {source.num_classes - 1}, but {who} predicts {classes} classes "
                        f"(0..{classes - 1})", f"drop or remap the rows labelled {classes} or more, or check "
                        "`source.label_column` (a teacher can only be distilled on the classes it knows)")


SCAN_MAX_BYTES = 2 << 30  # precompute reads a table's inputs in the driver up to this size; actors check the rest


def check_source_values(cfg: PrecomputeConfig, full: bool = False) -> None:
    """Non-finite inputs refused in the driver, before any Ray work, where the table is small enough to
    read here (or always, with `full`, for `distill validate`)."""
    from pipeline.data.sources import open_source

    check = getattr(open_source(cfg.source, cfg.storage), "check_values", None)
    if check is not None:
        check(None if full else SCAN_MAX_BYTES)


def validate_precompute(cfg: PrecomputeConfig) -> str:
    """Every check stage 1 makes before Ray, against the real data and weights (`distill validate`):
    the source (columns, ids, labels, shapes), the teachers' weights and one row. Returns a summary."""
    from pipeline.cache.manifest import manifest_uri
    from pipeline.models.factory import resolve_factory
    from pipeline.teacher.identity import resolve_target
    from pipeline.teacher.sizing import check_token_outputs, token_cache_line

    for teacher in cfg.all_teachers.values():
        resolve_factory(teacher.factory)
    storage.check_reachable(cfg.cache_root, "cache root", cfg.storage)
    target = resolve_target(cfg)
    check_token_outputs(cfg, target.source)
    check_source_values(cfg, full=True)
    check_teachers(cfg, target.source)
    size = token_cache_line(cfg, target.source)
    rows = ", ".join(f"{split} {n}" for split, n in target.source.rows.items())
    state = "complete" if storage.exists(manifest_uri(target.uri), cfg.storage) else "not computed yet"
    return (f"source {target.source.kind}: {rows} rows, {target.source.num_classes} classes, input {list(target.source.input_shape)}; "
            f"cache {target.uri} ({state})" + (f"; {size}" if size else ""))
