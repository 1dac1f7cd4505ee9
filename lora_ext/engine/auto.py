"""The auto rule: where each LoRA goes.

* A LoRA whose strength is constant over the run (``not spec.is_scheduled()``) is fused.
* A scheduled LoRA (keyframes, start/stop) starts on-the-fly, which is right at any step, and
  its modules' hooks measure the rows (batch x tokens) each module sees. At the first
  ``update(step, total)`` after a measured step, the rule prices the rest of the run both ways
  and keeps the cheaper, per LoRA:

  - re-fuse: the number of steps at which its strength vector (per component and block)
    changes, times the cost of re-fusing each of its modules (a fixed per-module cost, the
    weight's elementwise passes, and the GEMMs of every delta fused there);
  - on-the-fly: the remaining steps times, per module, the rows seen per step times the extra
    FLOPs per row (``2 r (in + out)`` for a low-rank adapter, ``2 in out`` for a dense delta)
    plus a fixed cost per hooked call.

  A start/stop window (two changes in a run) is fused and re-fused twice; a keyframe ramp
  (a change every step) stays on-the-fly, unless the modules see so few rows that a re-fuse
  is cheaper. Whatever is fused is re-fused only on steps where its strengths actually
  change, and a module whose fused bits come out the same is not written.

The prices are rough 2-core CPU figures in seconds; only their ratios matter.
"""
from __future__ import annotations

# --- the auto rule's price list (seconds; rough 2-core CPU figures, only their ratios matter) --
COST_FLOP = 2e-11  # one multiply-add pair of a matmul
COST_PASS = 1e-9  # one element through one elementwise pass
COST_REFUSE_MODULE = 3e-4  # fixed cost of re-fusing one module (python + small ops)
COST_HOOK_CALL = 3e-5  # fixed cost of one hooked forward call
REFUSE_PASSES = 16  # elementwise passes of a re-fuse (decode the old record, fuse, encode)




def decide(h) -> set:
    """Auto: per scheduled LoRA, re-fuse-on-change or on-the-fly, whichever is cheaper; returns the moved."""
    moved = set()
    if h.method != "auto" or h._total is None or h._step is None:
        return moved
    for e in h._entries:
        if not e.scheduled or e.decided_for == (h._total, h._hires):
            continue
        live = [h._mods[k].live for k in {c.target_key for c in e.contribs}]
        if not any(lv is not None and lv.calls for lv in live):
            continue  # nothing measured yet: stay on-the-fly one more step
        fuse_cost, live_cost, changes = costs(h, e)
        new = "fuse" if fuse_cost < live_cost else "onthefly"
        e.reason = (f"scheduled, {changes} strength changes in the remaining {h._total - h._step} steps: "
                    f"re-fuse ~{fuse_cost:.3g}s vs on-the-fly ~{live_cost:.3g}s")
        e.decided_for = (h._total, h._hires)
        if new != e.placement:
            e.placement = new
            moved.add(e)
    return moved


def costs(h, e) -> tuple:
    """(re-fuse cost, on-the-fly cost, most changes in any block) for the rest of the run."""
    step, total, hires = h._step, h._total, h._hires
    groups = {}
    for c in e.contribs:
        groups.setdefault((c.target.component, c.target.block), []).append(c)
    fuse_cost = live_cost = 0.0
    n_changes = 0
    remaining = max(1, total - step)
    for (comp, block), cs in groups.items():
        prev = float(e.spec.strength(comp, block, step - 1, total, hires=hires)) * e.mult if step > 0 else None
        changes = 0
        for t in range(step, total):
            s = float(e.spec.strength(comp, block, t, total, hires=hires)) * e.mult
            if prev is None or s != prev:
                changes += 1
            prev = s
        n_changes = max(n_changes, changes)
        for c in cs:
            m = h._mods[c.target_key]
            w = m.module.weight
            numel = w.numel()
            out = int(w.shape[0])
            k = numel // max(1, out)
            d_flops = 0
            for other in m.contribs:
                if other.entry.placement == "fuse" or other is c:
                    rank = other.lowrank_rank(tuple(w.shape)) if w.dim() > 1 else None
                    d_flops += 2 * out * k * rank if rank is not None else 10 * numel
            refuse = COST_REFUSE_MODULE + numel * REFUSE_PASSES * COST_PASS + 2 * d_flops * COST_FLOP
            fuse_cost += changes * refuse
            lv = m.live
            rows = lv.rows_seen if lv is not None else 0
            calls = lv.calls if lv is not None else 1
            rank = c.lowrank_rank(tuple(w.shape)) if w.dim() > 1 else None
            per_row = 2 * rank * (k + out) if rank is not None else 2 * numel
            live_cost += remaining * (rows * per_row * COST_FLOP + calls * COST_HOOK_CALL / max(1, len(m.contribs)))
    return fuse_cost, live_cost, n_changes
