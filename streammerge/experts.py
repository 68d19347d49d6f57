"""Fused MoE experts and PEFT's ``target_parameters`` LoRA (ParamWrapper).

transformers 5 keeps experts fused in memory (``mlp.experts.gate_up_proj`` [E, 2I, H],
``mlp.experts.down_proj`` [E, H, I]; gpt-oss stores them [E, in, out]); PEFT puts one LoRA on each
such parameter: ``lora_A`` [E * r, in], ``lora_B`` [out, E * r], and expert ``e``'s update is
``B.reshape(out, r, E)[:, :, e] @ A.reshape(E, r, in)[e] * scaling``, rounded to the weight's dtype
before it is added (two roundings). A checkpoint holds the parameter either fused (3-D) or, as
``save_pretrained`` writes Qwen-MoE / Mixtral, per expert in the transformers-4 layout
(``experts.N.gate_proj.weight`` and ``experts.N.up_proj.weight`` are the row halves of ``gate_up_proj``).
Here each wrapper is matched to its parameter by shapes (the saved keys do not name it) and turned into
updates of whichever tensors hold it; the executor merges a fused tensor one expert block at a time.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from .adapters import Adapter, ParamLora
from .errors import AdapterError
from .updates import ExpertDelta

#: the per-expert checkpoint tensors a fused parameter is made of, in row order (transformers-4 names)
SPLITS = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",))}
#: architectures whose fused experts are stored [E, in, out] (PEFT's ``is_transposed``), and those known
#: to store them [E, out, in]; for square experts of any other architecture the layout cannot be told
TRANSPOSED = {"gpt_oss"}
OUT_IN = {"qwen2_moe", "qwen3_moe", "mixtral"}


@dataclass(frozen=True)
class Place:
    """Where one fused parameter lives in the checkpoint: a 3-D tensor, or per-expert 2-D pieces
    ``(expert, tensor name, first row, end row)`` of each expert's [out, in] matrix."""

    param: str
    experts: int
    out_f: int
    in_f: int
    fused: str | None
    transposed: bool
    pieces: tuple[tuple[int, str, int, int], ...] = ()

    @property
    def tensors(self) -> list[str]:
        return [self.fused] if self.fused else [p[1] for p in self.pieces]


def locate(owner: str, param: str, shapes: dict[str, tuple[int, ...]], model_type: str) -> list[Place]:
    """The ways ``owner.param`` can be read in the checkpoint (a fused 3-D tensor whose layout is not
    known from the architecture gives both orientations)."""
    fused = f"{owner}.{param}"
    if fused in shapes and len(shapes[fused]) == 2:  # a plain 2-D parameter (a router): one "expert"
        out_f, in_f = shapes[fused]
        return [Place(param, 1, out_f, in_f, None, False, ((0, fused, 0, out_f),))]
    if fused in shapes and len(shapes[fused]) == 3:
        e, d1, d2 = shapes[fused]
        places = [Place(param, e, d1, d2, fused, False), Place(param, e, d2, d1, fused, True)]
        if model_type in TRANSPOSED:
            return places[1:]
        if d1 == d2 and model_type not in OUT_IN:
            raise AdapterError(
                f"{fused!r} {[e, d1, d2]}: square experts of a {model_type or 'unknown'} model may be stored "
                "[E, out, in] or [E, in, out], and nothing here tells which",
                hint="report the architecture to streammerge; its expert layout must be added to experts.py",
            )
        return places if d1 != d2 else places[:1]
    for subs in SPLITS.get(param, ()):
        pieces, e, in_f, out_f = [], 0, None, 0
        while all(f"{owner}.{e}.{sub}.weight" in shapes for sub in subs):
            row = 0
            for sub in subs:
                name = f"{owner}.{e}.{sub}.weight"
                rows, cols = shapes[name]
                pieces.append((e, name, row, row + rows))
                row, in_f = row + rows, cols if in_f is None else in_f
            out_f, e = row, e + 1
        if pieces:
            return [Place(param, e, out_f, in_f, None, False, tuple(pieces))]
    return []


def stored(ad: Adapter, owner: str, base_owner: str | None, shapes: dict, model_type: str) -> bool:
    """Whether the checkpoint holds any parameter ``owner``'s wrappers target under ``base_owner``."""
    return base_owner is not None and any(locate(base_owner, p, shapes, model_type) for p in _params_of(ad, owner))


def holders(param: str, modules: set[str], tensors: set[str]) -> set[str]:
    """The modules (adapter spelling) holding a parameter named ``param``: a fused tensor ``<m>.<param>``,
    or per-expert pieces ``<m>.<N>.<piece>`` of it."""
    found = {t[: -len(param) - 1] for t in tensors if t.endswith("." + param) and "." in t[: -len(param) - 1]}
    pieces = {p for subs in SPLITS.get(param, ()) for p in subs}
    for m in modules:
        hit = re.fullmatch(r"(.+)\.\d+\.([^.]+)", m)
        if hit and hit[2] in pieces:
            found.add(hit[1])
    return found


def untrained(ad: Adapter, modules: set[str], tensors: set[str]) -> list[str]:
    """Targeted parameters the adapter has no LoRA for: a ``target_parameters`` entry that no module of
    the base (``modules`` and ``tensors``, in the adapter's spelling) holds, or a module holding it without
    LoRA tensors (PEFT would refuse the first, and leave the second at its random initialisation)."""
    missing = []
    for target in ad.config.get("target_parameters") or ():
        part, _, param = target.rpartition(".")
        owners = set() if part else holders(param, modules, tensors)
        for m in modules if part else ():
            i = ("." + m + ".").find("." + part + ".")
            if i >= 0:
                owners.add(m[: i + len(part)])
        if not owners:
            missing.append(f"{target}: no module of the base holds it")
        missing += [f"{o}.{param}: no LoRA tensors in the file" for o in sorted(owners) if o not in ad.params]
    return missing


def _fits(w: ParamLora, place: Place, rank: int) -> bool:
    n = place.experts * rank
    return w.a.shape == (n, place.in_f) and w.b.shape == (place.out_f, n)


def _params_of(ad: Adapter, owner: str) -> list[str]:
    names = ad.config.get("target_parameters") or []
    return sorted(
        {n.rpartition(".")[2] for n in names if "." not in n or ("." + owner).endswith("." + n.rpartition(".")[0])}
    )


def assign(ad: Adapter, owner: str, base_owner: str, shapes: dict, model_type: str) -> list[tuple[ParamLora, Place]]:
    """Each wrapper of ``owner`` with the parameter (and its place in the checkpoint) whose shapes it
    fits; an adapter that fits none, or several ways, is an error naming the candidates."""
    wrappers = ad.params[owner]
    options = {p: locate(base_owner, p, shapes, model_type) for p in _params_of(ad, owner)}
    found = [
        list(zip(wrappers, combo, strict=True))
        for combo in itertools.permutations([pl for places in options.values() for pl in places], len(wrappers))
        if len({pl.param for pl in combo}) == len(combo)
        and all(_fits(w, pl, ad.rank_alpha(f"{owner}.{pl.param}")[0]) for w, pl in zip(wrappers, combo, strict=True))
    ]
    if len(found) == 1:
        return found[0]
    where = {p: [f"{pl.tensors[0]}{'' if pl.fused else ' ...'} [{pl.out_f} x {pl.in_f}] x {pl.experts}" for pl in v]
             for p, v in options.items()}  # fmt: skip
    shapes_of = [f"{w.a.name} {list(w.a.shape)}, {w.b.name} {list(w.b.shape)}" for w in wrappers]
    raise AdapterError(
        f"{ad.weights_file}: the target_parameters LoRA of {owner!r} fits the base's experts "
        f"{'in no' if not found else 'in ' + str(len(found))} way(s)",
        details=shapes_of + [f"{p}: {v or 'not in the checkpoint'}" for p, v in where.items()],
        hint="the adapter was trained on a different model, or its experts are stored in a layout not known here",
    )


def updates_for(ad: Adapter, w: ParamLora, place: Place, owner: str) -> list[tuple[str, ExpertDelta]]:
    """The updates one wrapper makes, per checkpoint tensor."""
    r, _, scaling = ad.rank_alpha(f"{owner}.{place.param}")

    def delta(expert, rows):
        return ExpertDelta(w.a, w.b, scaling, ad.weight, place.experts, r, expert, rows, place.transposed, ad.path)

    if place.fused:
        return [(place.fused, delta(None, None))]
    return [(name, delta(e, (r0, r1))) for e, name, r0, r1 in place.pieces]
