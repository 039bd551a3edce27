"""``KFC.distributed_state_dict()``: the optimizer's state in the form ``torch.distributed.checkpoint`` saves and loads.

DCP (``dcp.save`` / ``dcp.load``) writes each rank's own tensors (a ``DTensor`` as its shards) and loads *in place*
into a template state dict that already holds every key with a tensor of the right shape and dtype, resharding
``DTensor``s to the loading run's placements. This form is built for that (docs/algorithm.md §12.4), flat keys::

    "state.<param>.<slot>"                # per-parameter optimizer state, by the parameter's name in the model:
                                          #   momentum_buffer (KFC group, SGD fallback), step / exp_avg / exp_avg_sq
                                          #   (Adam fallback), average (iterate averaging); DTensors under FSDP2
    "kfc.layers.<layer>.A" / ".G"         # the layer's moving averages Ω, Γ (its layout's shapes)
    "kfc.layers.<layer>.inverse.<name>"   # its inverse's tensors (the damping method's, zero-padded to full size)
    "kfc.layers.<layer>.meta"             # bytes: which are present, update count, η, scale, shapes and strides
    "kfc.run"                             # bytes: what does not depend on the layers (the "kfc" entry of
                                          #   checkpoint.py without its layer tensors), the param-group settings

Every key exists whether or not its state does yet (a slot not created yet is zeros, marked absent in a bytes
item), so a fresh optimizer's dict is the template ``dcp.load`` fills. A rank holds the layers it owns only
(``distributed="owner"``, FSDP2: the layer assignment of the loading run, so a checkpoint of another world size is
re-owned; otherwise every layer, written once by DCP's de-duplication) and its shards of DTensor state: checkpoint
bytes and memory per rank scale as 1/world size, down to the share of the largest layer. The tensors are copies:
``dcp.load`` into the dict changes nothing until :func:`load_distributed_state` has checked it and hands it to
``KFC.load_state_dict`` as a plain state_dict, so the loads of both forms are one code path (same checks, same
restore, bitwise the same state).
"""
from __future__ import annotations

import io
from dataclasses import astuple

import torch

from kfc_compile.curvature.estimator import LayerState
from kfc_compile.curvature.inverses import inverse_kind
from kfc_compile.optim.checkpoint import check_kfc_state, factor_dtype, run_entry

FORMAT = 1
RUN = "kfc.run"
LAYERS = "kfc.layers."
STATE = "state."
_MOMENTUM = ("momentum_buffer",)
_ADAM = ("step", "exp_avg", "exp_avg_sq")


def pack(obj: object) -> bytes:
    """``obj`` serialised by ``torch.save`` (a leaf DCP saves as bytes and replaces whole on load)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: object, key: str) -> object:
    """The object :func:`pack` serialised (``weights_only``: plain types and tensors only).

    Raises:
        ValueError: ``data`` is not such bytes (the entry ``key`` was replaced by something else).
    """
    if not isinstance(data, bytes) or not data:
        raise ValueError(f"the distributed state dict's {key!r} is a {type(data).__name__}, not the bytes "
                         "distributed_state_dict() put there (and dcp.load fills in)")
    return torch.load(io.BytesIO(data), weights_only=True)


# -- what a rank holds ---------------------------------------------------------------------------------------------
def _require_layers(opt) -> None:
    if opt._pending_state is not None or (opt._estimator.live and not opt._estimator.states):
        raise RuntimeError("the distributed state dict of a kfc-compiled model needs its layers: run the compiled "
                           "model's forward once (and apply any loaded state_dict) before distributed_state_dict()")


def owned(opt) -> list[int]:
    """Indices of the layers whose state this rank holds: its own under owner preconditioning, else all."""
    est, d = opt._estimator, opt._dist
    if d is None or d.owner is None:
        return list(range(len(est.states)))
    return [i for i, r in enumerate(d.owner.owners(est.states)) if r == d.comm.rank]


def _param_slots(opt) -> list[tuple[str, torch.Tensor, tuple[str, ...]]]:
    """(name, parameter, state slots) of every optimised parameter, in ``torch.optim``'s state_dict order."""
    names = {id(p): n for n, p in opt._owner.named_parameters()}
    extra = ("average",) if opt.options.averaging is not None else ()
    out = []
    for g in opt.param_groups:
        keys = (_ADAM if g["role"] == "fallback" and opt.options.fallback == "adam" else _MOMENTUM) + extra
        out += [(names[id(p)], p, keys) for p in g["params"]]
    return out


def _slot_template(p: torch.Tensor, key: str) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64) if key == "step" else torch.zeros_like(p.detach())


def _layer_templates(s: LayerState, method: str) -> dict[str, torch.Tensor]:
    """Zero tensors for a layer's factors and its inverse's tensors at their full (dense / per-block) sizes."""
    dev, dt = s.layer.weight.device, factor_dtype(s)
    (na, ba, _), g_shape = s.layout.shapes()
    out = {"A": torch.zeros((na, ba, ba), dtype=dt, device=dev), "G": torch.zeros(g_shape, dtype=dt, device=dev)}
    kind = inverse_kind(method)
    ident = kind.identity(s.layout, 1.0, 1.0, dt, dev)
    for name in kind.state_tensors:
        t = getattr(ident, name, None)
        if t is not None:
            out[f"inverse.{name}"] = torch.zeros_like(t)
        elif name in ("live", "silent"):  # Ω coordinate indices of a live-block inverse
            out[f"inverse.{name}"] = torch.zeros(ba, dtype=torch.int64, device=dev)
        elif name == "silent_scale":  # one value per group
            out[f"inverse.{name}"] = torch.zeros((na, 1, 1), dtype=dt, device=dev)
        else:  # pragma: no cover - a new inverse kind must say its tensors' sizes here
            raise NotImplementedError(f"the distributed state dict does not know the size of {method!r} inverse "
                                      f"tensor {name!r}")
    return out


# -- save ----------------------------------------------------------------------------------------------------------
def _fit(v: torch.Tensor, template: torch.Tensor, key: str) -> torch.Tensor:
    """``v`` copied into a zero tensor like ``template`` (its leading corner: a live block fits a full factor)."""
    if v.dim() != template.dim() or any(a > b for a, b in zip(v.shape, template.shape, strict=True)):
        raise NotImplementedError(f"{key}: a tensor of shape {tuple(v.shape)} does not fit the distributed state "
                                  f"dict's {tuple(template.shape)}")
    out = torch.zeros_like(template)
    out[tuple(slice(0, n) for n in v.shape)] = v
    return out


def _layer_items(s: LayerState, method: str, prefix: str) -> dict[str, object]:
    items: dict[str, object] = _layer_templates(s, method)
    meta: dict = {"updates": None, "inverse": None, "strides": {}}
    if s.running is not None:
        for which in ("A", "G"):
            t = getattr(s.running, which)
            items[which] = _fit(t, items[which], prefix + which)
            meta["strides"][which] = t.stride()
        meta["updates"] = int(s.running.updates)
    if s.inverse is not None:
        st = s.inverse.state()
        shapes = {}
        for name, v in st["tensors"].items():
            key = f"inverse.{name}"
            items[key] = _fit(v, items[key], prefix + key)
            shapes[name] = (tuple(v.shape), v.stride())
        meta["inverse"] = {"method": st["method"], "eta": st["eta"], "scale": st["scale"], "layout": st["layout"],
                           "shapes": shapes}
    items["meta"] = pack(meta)
    return items


def distributed_state(opt) -> dict:
    """``KFC.distributed_state_dict()`` (see the module docstring); copies, so ``dcp.load`` may fill it in place."""
    _require_layers(opt)
    est = opt._estimator
    if opt._dist is not None:  # DDP: the ranks' pending factor shares averaged first (a collective), as state_dict
        opt._dist.settle(est.states)
    kfc = run_entry(est, opt.options, opt.health, opt._step_count, opt._warned, opt.options.approx, opt._dist)
    kfc["layers"] = [{"name": s.layer.name, "layout": astuple(s.layout), "frozen": s.frozen} for s in est.states]
    sd: dict[str, object] = {}
    present = {}
    for name, p, keys in _param_slots(opt):
        st = opt.state.get(p, {})
        unknown = sorted(set(st) - set(keys))
        if unknown:
            raise NotImplementedError(f"parameter {name!r} has optimizer state {unknown} that the distributed state "
                                      f"dict does not know (slots: {list(keys)})")
        present[name] = [k for k in keys if st.get(k) is not None]
        for k in keys:
            t = _slot_template(p, k)
            v = st.get(k)
            if v is not None and (tuple(v.shape) != tuple(t.shape) or hasattr(v, "device_mesh") != hasattr(
                    t, "device_mesh")):
                raise NotImplementedError(f"the {k!r} state of parameter {name!r} ({type(v).__name__} of shape "
                                          f"{tuple(v.shape)}) is not like its parameter")
            sd[f"{STATE}{name}.{k}"] = t if v is None else v.detach().to(t.dtype, copy=True)
    for i in owned(opt):
        s = est.states[i]
        prefix = f"{LAYERS}{s.layer.name}."
        sd.update({prefix + k: v for k, v in _layer_items(s, opt.options.damping_method, prefix).items()})
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    sd[RUN] = pack({"format": FORMAT, "kfc": kfc, "groups": groups, "present": present})
    return sd


# -- load ----------------------------------------------------------------------------------------------------------
def _get(sd: dict, key: str) -> object:
    if key not in sd:
        raise ValueError(f"the distributed state dict has no {key!r}: it is not this optimizer's template (take it "
                         "from opt.distributed_state_dict() of the loading run, on every rank)")
    return sd[key]


def _restored(t: torch.Tensor, shape: tuple, stride: tuple) -> torch.Tensor:
    """The saved tensor back from its zero-padded copy, with its saved strides (its products then run as before)."""
    out = torch.empty_strided(shape, stride, dtype=t.dtype, device=t.device)
    return out.copy_(t[tuple(slice(0, n) for n in shape)])


def _layer_entry(s: LayerState, sd: dict, entry: dict) -> dict:
    """A checkpoint.py layer entry from the loaded tensors of one layer this rank holds."""
    prefix = f"{LAYERS}{s.layer.name}."
    meta = unpack(_get(sd, prefix + "meta"), prefix + "meta")
    out = dict(entry)
    if meta["updates"] is not None:
        fac = {w: _get(sd, prefix + w) for w in ("A", "G")}
        out["factors"] = {w: _restored(t, tuple(t.shape), meta["strides"][w]) for w, t in fac.items()}
        out["factors"]["updates"] = meta["updates"]
    inv = meta["inverse"]
    if inv is not None:
        tensors = {name: _restored(_get(sd, f"{prefix}inverse.{name}"), shape, stride)
                   for name, (shape, stride) in inv["shapes"].items()}
        out["inverse"] = {k: v for k, v in inv.items() if k != "shapes"} | {"tensors": tensors}
    return out


def load_distributed_state(opt, sd: dict) -> None:
    """``KFC.load_distributed_state_dict(sd)``: check the loaded dict, then restore it as a plain state_dict.

    Raises:
        ValueError: not a (filled) distributed state dict of this optimizer: another layer set, parameter set,
            parameter groups or structural options (nothing is loaded).
    """
    _require_layers(opt)
    if not isinstance(sd, dict) or RUN not in sd:
        raise ValueError(f"not a KFC distributed state dict (no {RUN!r} entry): a plain state_dict() goes to "
                         "load_state_dict")
    run = unpack(sd[RUN], RUN)
    if run.get("format") != FORMAT:
        raise ValueError(f"unsupported KFC distributed state dict format {run.get('format')!r} (this kfc_compile "
                         f"reads {FORMAT})")
    est = opt._estimator
    kfc = dict(run["kfc"])
    kfc["layers"] = [{**m, "factors": None, "inverse": None} for m in kfc["layers"]]
    check_kfc_state(kfc, est, opt.options, opt.options.approx)  # the layer set and options, before the tensors
    for i in owned(opt):
        kfc["layers"][i] = _layer_entry(est.states[i], sd, kfc["layers"][i])
    check_kfc_state(kfc, est, opt.options, opt.options.approx)  # and the factor shapes
    slots = _param_slots(opt)
    names = [n for n, _, _ in slots]
    if sorted(run["present"]) != sorted(names):
        raise ValueError(f"the distributed state dict's parameters {sorted(run['present'])} are not this "
                         f"optimizer's {sorted(names)}: it was saved for another model or parameter set")
    roles = [g["role"] for g in opt.param_groups]
    if [g["role"] for g in run["groups"]] != roles:
        raise ValueError(f"the distributed state dict has parameter groups {[g['role'] for g in run['groups']]}, "
                         f"this optimizer {roles}")
    state, groups, index = {}, [], 0
    for g, saved in zip(opt.param_groups, run["groups"], strict=True):
        groups.append({**saved, "params": list(range(index, index + len(g["params"])))})
        index += len(g["params"])
    for i, (name, _, keys) in enumerate(slots):
        extra = [k for k in run["present"][name] if k not in keys]
        if extra:
            raise ValueError(f"parameter {name!r} was saved with optimizer state {extra} this optimizer does not "
                             f"keep ({list(keys)}): another fallback or averaging setting")
        entry = {k: _get(sd, f"{STATE}{name}.{k}") for k in run["present"][name]}
        if entry:
            state[i] = entry
    opt.load_state_dict({"state": state, "param_groups": groups, "kfc": kfc})
