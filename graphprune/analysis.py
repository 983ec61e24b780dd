"""Channel-group analysis: which channel positions must be removed together.

Walks a traced graph once, applying each node's op-table rule to the channel maps of its inputs
(see `tmap`). Rules record unions (positions that are the same channel), fixes (positions that
can never go, with the reason) and row layouts (heads, conv groups: every row keeps the same
count). Connected components over those unions give channel *classes*; classes that share a
producer space form a *group*. The result is an immutable `Analysis`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .errors import node_desc
from .tmap import FIXED, Factor, TMap, reshape_chunks, rigid
from .trace import Traced

__all__ = ["Analysis", "ChannelGroup", "SizeVal", "Builder", "analyze_graph"]


@dataclass(frozen=True, eq=False)
class SizeVal:
    """A Python int that came from a tensor's size; `ids` are the channel ids it counts."""

    value: Any
    ids: np.ndarray | None
    derived: bool = False


@dataclass(frozen=True, eq=False)
class ParamInfo:
    """A parameter/buffer tensor reached by the graph: its qualified names and channel map."""

    names: tuple[str, ...]
    tmap: TMap
    grouped_in: np.ndarray | None = None  # grouped conv weight: input ids as [groups, cin/g]


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Channels that must be removed together; `classes` are label ids in local order."""

    id: int
    size: int
    prunable: bool
    reason: str
    members: tuple[str, ...]
    classes: np.ndarray
    rows: np.ndarray | None = None  # [r, c] local indices: every row keeps the same count

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"unprunable: {self.reason}"
        return f"ChannelGroup(id={self.id}, size={self.size}, {state}, members={len(self.members)})"


@dataclass(frozen=True, eq=False)
class Analysis:
    """Immutable result of `analyze`: the traced graph, channel maps and channel groups."""

    traced: Traced
    tmaps: MappingProxyType  # node name -> TMap | tuple | SizeVal | None
    params: MappingProxyType  # tensor key -> ParamInfo
    labels: np.ndarray  # raw id -> class label
    class_group: np.ndarray  # label -> group id (-1 for hidden groups)
    groups: tuple[ChannelGroup, ...]
    notes: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    _cache: dict = field(default_factory=dict, repr=False)

    def segments(self) -> dict[int, list[tuple[list[int], str]]]:
        """Per group: the local channel indices each parameter axis sees (computed once)."""
        if "segments" not in self._cache:
            local = np.zeros(len(self.class_group), np.int64)
            for g in self.groups:
                local[g.classes] = np.arange(g.size)
            out: dict[int, list] = {}
            for info in self.params.values():
                for f in info.tmap.factors:
                    labs = self.labels[f.ids.reshape(-1)]
                    gid = int(self.class_group[labs[0]])
                    if gid < 0:
                        continue
                    labs = labs[self.class_group[labs] == gid]
                    seg = np.unique(local[labs]).tolist()
                    out.setdefault(gid, []).append((seg, f"that {info.names[0]}[{f.axes[0]}]"))
            self._cache["segments"] = out
        return self._cache["segments"]

    @property
    def graph(self) -> fx.GraphModule:
        return self.traced.gm

    @property
    def prunable_groups(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.prunable)

    def group(self, gid: int) -> ChannelGroup:
        return self.groups[gid]

    def summary(self, max_members: int = 3) -> str:
        from .report import analysis_table

        return analysis_table(self, max_members)

    def __repr__(self) -> str:
        n = len(self.groups)
        p = len(self.prunable_groups)
        return f"Analysis({self.traced.model_name}: {n} groups, {p} prunable)"


class Builder:
    """Mutable state used only while the analysis runs; rules call its methods."""

    def __init__(self, traced: Traced):
        self.traced = traced
        self.gm = traced.gm
        self.modules = dict(self.gm.named_modules())
        self.n_ids = 1  # id 0 is FIXED
        self.spaces: list[tuple[int, int]] = []
        self.edges_a: list[np.ndarray] = []
        self.edges_b: list[np.ndarray] = []
        self.fixes: list[tuple[np.ndarray, str]] = []
        self.arrangements: list[tuple[np.ndarray, str]] = []
        self.tmaps: dict[str, Any] = {}
        self.params: dict[int, dict] = {}  # id(tensor) -> {"names", "tmap", "grouped_in"}
        self.notes: dict[str, dict] = {}
        self.produced: list[np.ndarray] = []
        self.node: fx.Node | None = None

    # ---- ids ------------------------------------------------------------------------------
    def fresh(self, shape) -> np.ndarray:
        n = int(np.prod(shape)) if len(np.shape(shape)) else int(shape)
        ids = np.arange(self.n_ids, self.n_ids + n, dtype=np.int64)
        self.spaces.append((self.n_ids, n))
        self.n_ids += n
        return ids.reshape(shape) if len(np.shape(shape)) else ids

    def here(self) -> str:
        if self.node is None:
            return "?"
        mod = self.module(self.node)
        return node_desc(self.node, type(mod).__name__ if mod is not None else None)

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a).reshape(-1)
        b = np.asarray(b).reshape(-1)
        if a.shape != b.shape:
            raise ValueError(f"unify size mismatch {a.shape} vs {b.shape} at {self.here()}")
        self.edges_a.append(a)
        self.edges_b.append(b)
        if (a == FIXED).any() or (b == FIXED).any():
            self.fixes.append(
                (np.concatenate([a, b]), f"coupled to a fixed channel at {self.here()}")
            )

    def produce(self, ids) -> None:
        """Mark ids as a layer's output channels (groups without any are only shown if free)."""
        if ids is not None:
            self.produced.append(np.asarray(ids).reshape(-1))

    def fix(self, ids, reason: str) -> None:
        ids = np.asarray(ids).reshape(-1)
        if ids.size:
            self.fixes.append((ids, f"{reason} at {self.here()}"))

    def fix_map(self, v, reason: str) -> None:
        for tm in iter_maps(v):
            for f in tm.factors:
                self.fix(f.ids, reason)
        for s in iter_sizes(v):
            if s.ids is not None:
                self.fix(s.ids, reason)

    def arrange(self, arr: np.ndarray) -> None:
        """Every row of arr keeps the same number of elements."""
        arr = np.asarray(arr)
        if arr.ndim != 2 or arr.shape[0] <= 1:
            return
        if arr.shape[1] == 1:
            self.fix(arr, "axis length cannot change")
            return
        self.arrangements.append((arr, self.here()))

    def no_shrink(self, f: Factor, axis: int) -> None:
        """The tensor axis `axis` (part of factor f) must keep its length."""
        if len(f.axes) == 1:
            self.fix(f.ids, "channel axis meets an axis whose length cannot change")
            return
        k = f.axes.index(axis)
        self.arrange(np.moveaxis(f.ids, k, 0).reshape(f.ids.shape[k], -1))

    # ---- graph access ---------------------------------------------------------------------
    def module(self, node: fx.Node):
        return self.modules.get(node.target) if node.op == "call_module" else None

    def tm(self, x):
        if isinstance(x, fx.Node):
            return self.tmaps.get(x.name)
        return None

    def val(self, node: fx.Node):
        return node.meta.get("val")

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        v = self.val(node)
        return tuple(int(s) for s in v.shape)

    def param_tensor(self, target: str):
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def param(self, target: str) -> TMap | None:
        """Channel map of a parameter/buffer by qualified name (fresh ids per axis at first use)."""
        t = self.param_tensor(target)
        if not isinstance(t, torch.Tensor):
            return None
        key = id(t)
        info = self.params.get(key)
        if info is None:
            shape = tuple(int(s) for s in t.shape)
            factors = tuple(
                Factor((a,), self.fresh(s)) for a, s in enumerate(shape) if s > 1
            )
            info = {"names": [target], "tmap": TMap(shape, factors), "grouped_in": None}
            self.params[key] = info
        elif target not in info["names"]:
            info["names"].append(target)
        return info["tmap"]

    def param_key(self, x) -> int | None:
        """id(tensor) of a get_attr node's tensor, else None."""
        if isinstance(x, fx.Node) and x.op == "get_attr":
            t = self.param_tensor(x.target)
            if isinstance(t, torch.Tensor):
                return id(t)
        return None

    def note(self, **kw) -> None:
        self.notes.setdefault(self.node.name, {}).update(kw)

    # ---- channel-map algebra that records couplings ----------------------------------------
    def merge(self, maps: list[TMap], out_shape) -> TMap:
        """Broadcast-merge maps already aligned to out_shape (elementwise ops, batch dims)."""
        out_shape = tuple(int(s) for s in out_shape)
        nd = len(out_shape)
        facs = [f for tm in maps for f in tm.factors]
        # union factors sharing an axis
        comps: list[list[Factor]] = []
        for f in facs:
            hit = [c for c in comps if any(set(f.axes) & set(g.axes) for g in c)]
            new = [f] + [g for c in hit for g in c]
            comps = [c for c in comps if c not in hit] + [new]
        out_factors = []
        for comp in comps:
            axes = tuple(sorted({a for f in comp for a in f.axes}))
            shape = tuple(out_shape[a] for a in axes)
            best = max(comp, key=lambda f: len(f.axes))
            base = _broadcast_ids(best, axes, shape)
            for f in comp:
                if f is best:
                    continue
                self.unify(base, _broadcast_ids(f, axes, shape))
            rows = next((f.rows for f in comp if f.rows is not None), None)
            out_factors.append(Factor(axes, base, rows))
        out = TMap(out_shape, tuple(out_factors))
        # a full-length rigid axis in any input pins the factor's length on that axis; a pinned
        # single-axis factor is then just a rigid axis (position embeddings on the token axis)
        pinned = set()
        for tm in maps:
            for a in range(nd):
                if out_shape[a] > 1 and tm.shape[a] == out_shape[a] and tm.factor_of(a) is None:
                    f = out.factor_of(a)
                    if f is not None and id(f) not in pinned:
                        self.no_shrink(f, a)
                        if len(f.axes) == 1:
                            pinned.add(id(f))
        if pinned:
            out = TMap(out_shape, tuple(f for f in out.factors if id(f) not in pinned))
        return out

    def align(self, tm: TMap, nd: int) -> TMap:
        """Right-align a map to nd dims (prepend size-1 axes)."""
        while tm.ndim < nd:
            tm = tm.insert_axis(0)
        return tm

    def drop_axis(self, tm: TMap, axis: int) -> TMap:
        """Remove an axis (contraction, reduction, int indexing); joint factors leave rigid axes."""
        axis = axis % tm.ndim
        out = []
        for f in tm.factors:
            if axis not in f.axes:
                out.append(Factor(tuple(a - (a > axis) for a in f.axes), f.ids, f.rows))
            elif len(f.axes) > 1:
                for a in f.axes:
                    if a != axis:
                        self.no_shrink(f, a)
        return TMap(tm.shape[:axis] + tm.shape[axis + 1 :], tuple(out))

    def select(self, tm: TMap, axis: int, index: int) -> TMap:
        """Take one index along an axis (int indexing, select, unbind)."""
        axis = axis % tm.ndim
        f = tm.factor_of(axis)
        if f is None:
            return self.drop_axis(tm, axis)
        if len(f.axes) == 1:
            self.fix(f.ids, "a single channel is selected by index")
            return self.drop_axis(tm, axis)
        self.no_shrink(f, axis)  # e.g. q/k/v = qkv[0], qkv[1], qkv[2]
        k = f.axes.index(axis)
        sub = Factor(
            tuple(a - (a > axis) for a in f.axes if a != axis),
            np.take(f.ids, int(index), axis=k),
            f.rows,
        )
        rest = TMap(tm.shape, tuple(g for g in tm.factors if g is not f))
        out = self.drop_axis(rest, axis)
        fs = tuple(sorted(out.factors + (sub,), key=lambda g: g.axes))
        if len(sub.axes) == 1:
            sub = Factor(sub.axes, sub.ids)
            fs = tuple(sorted([g for g in out.factors] + [sub], key=lambda g: g.axes))
        return TMap(out.shape, fs)

    def reshape(self, tm: TMap, new_shape) -> TMap:
        """Channel map after view/reshape/flatten/unflatten."""
        new_shape = tuple(int(s) for s in new_shape)
        if not tm.factors:
            return rigid(new_shape)
        if new_shape == tm.shape:
            return tm
        chunks = reshape_chunks(tm.shape, new_shape)
        if chunks is None:
            self.fix_map(tm, "reshape not understood")
            return rigid(new_shape)
        # axes that map one-to-one (same size, alone in their chunk) just move
        ident = {ia[0]: jb[0] for ia, jb in chunks
                 if len(ia) == 1 and len(jb) == 1 and tm.shape[ia[0]] == new_shape[jb[0]]}
        out: list[Factor] = []
        moved = set()
        for f in tm.factors:
            if len(f.axes) > 1 and all(a in ident for a in f.axes):
                out.append(Factor(tuple(ident[a] for a in f.axes), f.ids, f.rows))
                moved.add(id(f))
        for ia, jb in chunks:
            fs = [f for f in tm.factors if set(f.axes) & set(ia) and id(f) not in moved]
            if not fs:
                continue
            if len(fs) > 1 or not set(fs[0].axes) <= set(ia):
                for f in fs:
                    self.fix(f.ids, "reshape mixes several channel axes")
                continue
            f = fs[0]
            in_shape = tuple(tm.shape[a] for a in ia)
            full = _broadcast_ids(f, tuple(ia), in_shape)
            if len(f.axes) > 1 and len(jb) >= 1:
                self._check_merge_order(f, full, jb, new_shape)
            out_shape = tuple(new_shape[b] for b in jb)
            full = full.reshape(out_shape)
            varying = [
                k for k in range(full.ndim) if full.shape[k] > 1 and np.any(np.diff(full, axis=k))
            ]
            if not varying:
                if full.size > 1:  # one element spread over a whole axis: it cannot be removed
                    self.fix(np.unique(full), "reshape repeats one channel")
                continue
            red = full
            for k in reversed(range(full.ndim)):
                if k not in varying:
                    red = np.take(red, 0, axis=k)
            axes = tuple(jb[k] for k in varying)
            rows = None
            if len(axes) > 1:
                rows = red.reshape(-1, red.shape[-1])
                self.arrange(rows)
            out.append(Factor(axes, red, rows))
        return TMap(new_shape, tuple(out))

    def _check_merge_order(self, f: Factor, full, jb, new_shape) -> None:
        """Merging a split axis back in another order (channel shuffle) couples the columns."""
        if f.rows is None:
            return
        flat = full.reshape(-1)
        rows = f.rows
        pos = {int(x): i for i, x in enumerate(flat)}
        ok = True
        present = []
        for r in rows:
            idx = [pos[int(x)] for x in r if int(x) in pos]
            if idx:
                present.append(r)
                ok = ok and idx == list(range(idx[0], idx[0] + len(idx)))
        if ok:
            return
        for r in present[1:]:
            self.unify(present[0], r)

    # ---- final ----------------------------------------------------------------------------
    def finish(self) -> Analysis:
        return _finish(self)


def _broadcast_ids(f: Factor, axes: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """f.ids placed on `axes` (which contain f.axes) and broadcast over the rest."""
    idx = [axes.index(a) for a in f.axes]
    view_shape = [1] * len(axes)
    for k, i in enumerate(idx):
        view_shape[i] = f.ids.shape[k]
    return np.broadcast_to(f.ids.reshape(view_shape), shape).copy()


def iter_maps(v):
    if isinstance(v, TMap):
        yield v
    elif isinstance(v, (tuple, list)):
        for x in v:
            yield from iter_maps(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from iter_maps(x)


def iter_sizes(v):
    if isinstance(v, SizeVal):
        yield v
    elif isinstance(v, (tuple, list)):
        for x in v:
            yield from iter_sizes(x)


def analyze_graph(traced: Traced) -> Analysis:
    """Run every node's rule in order and form the channel groups."""
    from . import rules, rules_nn  # noqa: F401  (fill the op table)

    b = Builder(traced)
    for node in traced.gm.graph.nodes:
        b.node = node
        b.tmaps[node.name] = rules.dispatch(b, node)
    b.node = None
    return b.finish()


def _components(n: int, a: np.ndarray, c: np.ndarray) -> np.ndarray:
    m = coo_matrix((np.ones(len(a), dtype=np.int8), (a, c)), shape=(n, n))
    return connected_components(m, directed=False)[1]


def _finish(b: Builder) -> Analysis:
    n = b.n_ids
    ea = np.concatenate(b.edges_a) if b.edges_a else np.zeros(0, np.int64)
    eb = np.concatenate(b.edges_b) if b.edges_b else np.zeros(0, np.int64)
    raw = _components(n, ea, eb)
    # relabel classes in order of first id
    _, first = np.unique(raw, return_index=True)
    order = np.argsort(first)
    relabel = np.empty(len(order), np.int64)
    relabel[order] = np.arange(len(order))
    labels = relabel[raw]
    n_cls = len(order)
    # groups: classes joined through shared producer spaces (spaces whose own ids sit on an
    # activation; a consumer's weight axis only mirrors what it reads and links nothing)
    activations = {nd.name for nd in b.gm.graph.nodes if nd.op != "get_attr"}
    on_act = np.zeros(n, bool)
    for name, v in b.tmaps.items():
        if name in activations:
            for tm in iter_maps(v):
                for f in tm.factors:
                    on_act[f.ids.reshape(-1)] = True
    sa = [np.arange(s, s + k - 1) for s, k in b.spaces if k > 1 and on_act[s : s + k].any()]
    sa = np.concatenate(sa) if sa else np.zeros(0, np.int64)
    ga = np.concatenate([labels[sa], labels[ea]]) if len(sa) or len(ea) else np.zeros(0, np.int64)
    gb = np.concatenate([labels[sa + 1], labels[eb]]) if len(sa) or len(eb) else ga
    graw = _components(n_cls, ga, gb)
    fixed_reason: dict[int, str] = {}
    fixed = np.zeros(n_cls, bool)
    fixed[labels[FIXED]] = True
    for ids, why in b.fixes:
        ls = np.unique(labels[ids])
        new = ls[~fixed[ls]]
        fixed[ls] = True
        for lab in new:
            fixed_reason.setdefault(int(graw[lab]), why)
    # visible groups: those that appear on some activation tensor
    seen = np.zeros(n_cls, bool)
    seen[labels[on_act]] = True
    fixed_grp = np.zeros(graw.max() + 1 if n_cls else 0, bool)
    np.logical_or.at(fixed_grp, graw, fixed)
    vis_grp = np.zeros_like(fixed_grp)
    np.logical_or.at(vis_grp, graw, seen)
    vis_grp[graw[labels[FIXED]]] = False
    prod_grp = np.zeros_like(fixed_grp)
    if b.produced:
        prod_grp[graw[labels[np.concatenate(b.produced)]]] = True
    vis_grp &= prod_grp | ~fixed_grp  # hide pinned axes of parameters/constants used directly
    # arrangements by group
    arr_by_grp: dict[int, list] = {}
    for arr, where in b.arrangements:
        lab = labels[arr]
        arr_by_grp.setdefault(int(graw[lab.flat[0]]), []).append((lab, where))
    members_by_grp = _members(b, labels, graw)
    groups = []
    class_group = np.full(n_cls, -1, np.int64)
    for g in np.flatnonzero(vis_grp):
        classes = np.flatnonzero(graw == g)  # ascending = creation order
        gid = len(groups)
        class_group[classes] = gid
        reason = ""
        prunable = True
        if fixed_grp[g]:
            prunable = False
            reason = fixed_reason.get(int(g), "touches a fixed channel")
        rows = None
        if g in arr_by_grp:
            rows, why = _rows(classes, arr_by_grp[int(g)])
            if rows is None and why and prunable:
                prunable, reason = False, why
        if len(classes) < 2 and prunable:
            prunable, reason = False, "a single channel"
        groups.append(
            ChannelGroup(
                id=gid,
                size=len(classes),
                prunable=prunable,
                reason=reason,
                members=tuple(members_by_grp.get(int(g), ())),
                classes=classes,
                rows=rows,
            )
        )
    for g in groups:
        g.classes.setflags(write=False)
    params = {
        k: ParamInfo(tuple(v["names"]), v["tmap"], v["grouped_in"]) for k, v in b.params.items()
    }
    labels.setflags(write=False)
    return Analysis(
        traced=b.traced,
        tmaps=MappingProxyType(dict(b.tmaps)),
        params=MappingProxyType(params),
        labels=labels,
        class_group=class_group,
        groups=tuple(groups),
        notes=MappingProxyType({k: MappingProxyType(v) for k, v in b.notes.items()}),
    )


def _members(b: Builder, labels, graw) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for info in b.params.values():
        name = info["names"][0]
        for f in info["tmap"].factors:
            g = int(graw[labels[f.ids.flat[0]]])
            out.setdefault(g, []).append(f"{name}[{f.axes[0]}]")
    return out


def _rows(classes: np.ndarray, arrs) -> tuple[np.ndarray | None, str]:
    """One consistent row layout (local indices) for a group, or None and why not."""
    local = {int(c): i for i, c in enumerate(classes)}
    layouts = []
    for lab, where in arrs:
        rows, seen_rows = [], set()
        for r in lab:
            u = list(dict.fromkeys(int(x) for x in r))
            key = frozenset(u)
            if key in seen_rows:  # identical rows (columns were coupled): one constraint
                continue
            seen_rows.add(key)
            rows.append(u)
        if len(rows) == 1:
            continue
        if len({len(r) for r in rows}) != 1:
            return None, f"uneven head/group layout at {where}"
        key = frozenset(frozenset(r) for r in rows)
        if sum(len(r) for r in rows) != len({x for r in rows for x in r}):
            return None, f"overlapping head/group layout at {where}"
        layouts.append((key, rows, where))
    if not layouts:
        return None, ""
    keys = {k for k, _, _ in layouts}
    if len(keys) > 1:
        # accept if one layout refines all others (its rows nest inside theirs)
        fine = min(layouts, key=lambda t: len(t[1][0]))
        for _k, rows, where in layouts:
            covered = {x for rr in rows for x in rr}
            for r in fine[1]:
                if set(r) & covered and not any(set(r) <= set(rr) for rr in rows):
                    return None, f"conflicting head/group layouts at {fine[2]} and {where}"
        layouts = [fine]
    rows = layouts[0][1]
    covered = {x for r in rows for x in r}
    if covered != set(local):
        return None, f"head/group layout covers part of the group at {layouts[0][2]}"
    return np.array([[local[x] for x in r] for r in rows], dtype=np.int64), ""
