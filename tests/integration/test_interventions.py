"""Head ablations and activation patching on the tiny random models (Llama, Qwen2-GQA, GPT-2)."""

from __future__ import annotations

import pytest
import torch

from retrieval_heads import Head
from retrieval_heads.interventions import (
    MODES,
    Ablation,
    ablate,
    kv_group,
    mean_head_z,
    patch_heads,
    patch_heads_batch,
    patched_logits,
    patched_logits_batch,
    record_z,
)

TOL = 1e-6  # "unchanged"
ATOL = 1e-5  # two float32 computations of the same thing
N = 10  # prompt length of the prefill tests; decode tests prefill N - 1 and step once
ABLATED = [Head(1, 0), Head(1, 2)]  # two heads of the last layer: layer 0 must stay as is
BLOCKED = (2, 3, 4)


def capture(model, names=("z", "pattern")):
    """Hooks recording each layer's activations; ``get(layer, name)`` joins the chunks."""
    store: dict[tuple[int, str], list[torch.Tensor]] = {}

    def make(key):
        def fn(act, hook):
            store.setdefault(key, []).append(act.detach().clone())

        return fn

    hooks = [
        (model.hook_name(layer, name), make((layer, name)))
        for layer in range(model.n_layers)
        for name in names
    ]

    def get(layer: int, name: str) -> torch.Tensor:
        chunks = store[(layer, name)]
        if name in ("pattern", "attn_scores"):  # [batch, head, chunk, keys so far]: pad keys
            n_keys = chunks[-1].shape[-1]
            chunks = [torch.nn.functional.pad(c, (0, n_keys - c.shape[-1])) for c in chunks]
            return torch.cat(chunks, dim=2)
        return torch.cat(chunks, dim=1)

    return hooks, get


def run(model, ids, ablation: Ablation | None, where: str, names=("z", "pattern")):
    """One hooked prefill of ``ids`` (where="prefill") or a prefill of all but the last token
    and one decode step (where="decode"), with the ablation's hooks for that phase."""
    hooks, get = capture(model, names)
    if where == "prefill":
        extra = ablation.prefill_hooks(model) if ablation else []
        state = model.prefill(ids, fwd_hooks=[*extra, *hooks])
    else:
        state = model.prefill(ids[:, :-1])
        extra = ablation.decode_hooks(model) if ablation else []
        model.step(state, ids[:, -1], fwd_hooks=[*extra, *hooks])
    return get, state.last_logits


def make_ablation(model, mode, random_ids, heads=ABLATED, phase="all") -> Ablation:
    kwargs = {}
    if mode == "mean":
        kwargs["mean_z"] = mean_head_z(model, [random_ids(12, seed=21), random_ids(7, seed=22)])
    elif mode == "resample":
        # Another trial: same prompt length (prefill replay), decoded for two steps.
        kwargs["resample"] = record_z(model, random_ids(N, seed=23), heads, n_steps=2, phase="all")
    elif mode == "knockout":
        kwargs["blocked_positions"] = BLOCKED
    return Ablation(heads, mode, phase, model=model, **kwargs)


# ---- every mode touches exactly the heads asked for ------------------------------------------


@pytest.mark.parametrize("where", ["prefill", "decode"])
@pytest.mark.parametrize("mode", list(MODES))
def test_mode_changes_exactly_the_chosen_heads(any_model, random_ids, mode, where):
    m = any_model
    ids = random_ids(N, seed=1)
    abl = make_ablation(m, mode, random_ids)
    base, base_logits = run(m, ids, None, where)
    got, logits = run(m, ids, abl, where)
    for layer in range(m.n_layers):
        z0, z1 = base(layer, "z"), got(layer, "z")
        for h in range(m.n_heads):
            diff = (z1[:, :, h] - z0[:, :, h]).abs().max().item()
            if Head(layer, h) in ABLATED:
                assert diff > 1e-3, f"{mode}: ablated head {layer}.{h} did not change"
            else:
                assert diff <= TOL, f"{mode}: head {layer}.{h} changed by {diff:.3g}"
    assert (logits - base_logits).abs().max() > 1e-4
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("mode", ["zero", "mean", "resample"])
def test_z_modes_set_the_given_values(any_model, random_ids, mode):
    m = any_model
    ids = random_ids(N, seed=2)
    abl = make_ablation(m, mode, random_ids)
    for where in ("prefill", "decode"):
        got, _ = run(m, ids, abl, where, names=("z",))
        for head in ABLATED:
            z = got(head.layer, "z")[:, :, head.head]  # [batch, pos, d_head]
            if mode == "zero":
                expected = torch.zeros_like(z)
            elif mode == "mean":
                expected = abl.mean_z[head.layer, head.head].expand_as(z)
            else:  # prefill: the recorded prompt positions; decode: the recorded step 0
                rec = abl.resample.z(head, "prefill" if where == "prefill" else "decode")
                expected = rec if where == "prefill" else rec[:, :1]
            torch.testing.assert_close(z, expected, atol=TOL, rtol=0)


def test_ablating_an_early_layer_leaves_its_other_heads(gqa_model, random_ids):
    m = gqa_model
    ids = random_ids(N, seed=3)
    abl = Ablation(["0.3"], "zero", model=m)
    base, _ = run(m, ids, None, "decode", names=("z",))
    got, _ = run(m, ids, abl, "decode", names=("z",))
    torch.testing.assert_close(got(0, "z")[:, :, :3], base(0, "z")[:, :, :3], atol=TOL, rtol=0)
    assert got(0, "z")[:, :, 3].abs().max() == 0
    assert (got(1, "z") - base(1, "z")).abs().max() > 1e-4  # downstream heads see the change


# ---- uniform ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_uniform_rows_are_uniform_over_the_visible_keys(any_model, random_ids, monkeypatch, where):
    m = any_model
    monkeypatch.setattr(m, "chunk_size", 4)  # 10 tokens: chunks of 4, 4, 2
    ids = random_ids(N, seed=4)
    base, _ = run(m, ids, None, where)
    got, _ = run(m, ids, make_ablation(m, "uniform", random_ids), where)
    for head in ABLATED:
        pattern = got(head.layer, "pattern")[0, head.head]  # [query, key]
        first = 0 if where == "prefill" else N - 1
        queries = torch.arange(first, N)
        visible = torch.arange(N)[None, :] <= queries[:, None]
        expected = visible / visible.sum(dim=1, keepdim=True)
        torch.testing.assert_close(pattern, expected, atol=1e-6, rtol=0)
    # The other heads' patterns are untouched.
    others = [h for h in range(m.n_heads) if Head(1, h) not in ABLATED]
    torch.testing.assert_close(
        got(1, "pattern")[:, others], base(1, "pattern")[:, others], atol=TOL, rtol=0
    )


def test_uniform_zeroes_the_rotated_queries(llama_model, random_ids):
    """hook_q fires before RoPE; a zero query rotates to zero (checked at hook_rot_q)."""
    m = llama_model
    ids = random_ids(N, seed=5)
    names = ("rot_q", "attn_scores")
    base, _ = run(m, ids, None, "prefill", names)
    got, _ = run(m, ids, make_ablation(m, "uniform", random_ids), "prefill", names)
    rot_q = got(1, "rot_q")  # [batch, pos, head, d_head]
    assert rot_q[:, :, [0, 2]].abs().max() == 0
    # The other heads of the layer keep the queries (and scores) of the un-ablated run.
    assert base(1, "rot_q")[:, :, [1, 3]].abs().max() > 0.1
    torch.testing.assert_close(
        rot_q[:, :, [1, 3]], base(1, "rot_q")[:, :, [1, 3]], atol=TOL, rtol=0
    )
    visible = torch.ones(N, N, dtype=torch.bool).tril()
    torch.testing.assert_close(
        got(1, "attn_scores")[0, [1, 3]][:, visible],
        base(1, "attn_scores")[0, [1, 3]][:, visible],
        atol=TOL,
        rtol=0,
    )
    scores = got(1, "attn_scores")[0, [0, 2]]
    assert scores[:, visible].abs().max() == 0


# ---- knockout --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_knockout_blocks_the_positions_and_renormalises(any_model, random_ids, monkeypatch, where):
    m = any_model
    monkeypatch.setattr(m, "chunk_size", 3)  # blocked keys 2-4 straddle chunks
    ids = random_ids(N, seed=6)
    base, _ = run(m, ids, None, where)
    got, _ = run(m, ids, make_ablation(m, "knockout", random_ids), where)
    blocked = list(BLOCKED)
    for head in ABLATED:
        old = base(head.layer, "pattern")[0, head.head]  # [query, key]
        new = got(head.layer, "pattern")[0, head.head]
        assert new[:, blocked].abs().max() == 0
        keep = torch.ones(N, dtype=torch.bool)
        keep[blocked] = False
        # Softmax over the remaining keys: the old weights renormalised.
        expected = old * keep / (old * keep).sum(dim=-1, keepdim=True)
        torch.testing.assert_close(new, expected, atol=1e-5, rtol=0)
    others = [h for h in range(m.n_heads) if Head(1, h) not in ABLATED]
    torch.testing.assert_close(
        got(1, "pattern")[:, others], base(1, "pattern")[:, others], atol=TOL, rtol=0
    )


def test_knockout_of_every_visible_key_attends_nowhere(llama_model, random_ids):
    """Query 0 sees only key 0; blocking it leaves a zero row (not NaN, not future keys)."""
    m = llama_model
    ids = random_ids(N, seed=7)
    abl = Ablation(["1.1"], "knockout", "all", blocked_positions=[0, 1], model=m)
    got, logits = run(m, ids, abl, "prefill", names=("z", "pattern"))
    pattern = got(1, "pattern")[0, 1]
    assert pattern[:2].abs().max() == 0
    torch.testing.assert_close(pattern[2:].sum(-1), torch.ones(N - 2), atol=1e-6, rtol=0)
    assert got(1, "z")[0, :2, 1].abs().max() == 0
    assert torch.isfinite(logits).all()


def test_knockout_in_decode_uses_absolute_positions(llama_model, random_ids):
    """In a decode step the key axis is every position so far: block a late one."""
    m = llama_model
    ids = random_ids(N, seed=8)
    abl = Ablation(["1.3"], "knockout", blocked_positions=[N - 2, N + 5], model=m)  # N+5: unseen
    got, _ = run(m, ids, abl, "decode")
    row = got(1, "pattern")[0, 3, 0]
    assert row.shape == (N,) and row[N - 2] == 0 and abs(row.sum().item() - 1) < 1e-6


# ---- phases, resample bookkeeping, GQA -------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_decode_phase_leaves_the_prefill_untouched(llama_model, random_ids, mode):
    m = llama_model
    ids = random_ids(N, seed=9)
    abl = make_ablation(m, mode, random_ids, phase="decode")
    assert abl.prefill_hooks(m) == []
    base, _ = run(m, ids, None, "prefill", names=("z",))
    got, _ = run(m, ids, abl, "prefill", names=("z",))
    for layer in range(m.n_layers):
        torch.testing.assert_close(got(layer, "z"), base(layer, "z"), atol=0, rtol=0)
    assert abl.decode_hooks(m)  # ... while the decode steps are ablated


def test_resample_replays_decode_steps_in_order(llama_model, random_ids):
    m = llama_model
    source = record_z(m, random_ids(7, seed=10), ABLATED, n_steps=3)  # another length: fine
    assert source.n_steps == 3 and source.prompt_length == 0 and source.tokens.shape == (1, 3)
    abl = Ablation(ABLATED, "resample", resample=source, model=m)
    state = m.prefill(random_ids(N, seed=11))
    hooks = abl.decode_hooks(m)
    seen, get = capture(m, ("z",))
    token = torch.tensor([20])
    for _ in range(3):
        m.step(state, token, fwd_hooks=[*hooks, *seen])
    z = get(1, "z")  # [1, 3 steps, head, d_head]
    for head in ABLATED:
        torch.testing.assert_close(z[:, :, head.head], source.z(head), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="3 decode steps"):
        m.step(state, token, fwd_hooks=hooks)
    other = m.prefill(random_ids(N, seed=12))
    with pytest.raises(RuntimeError, match="for each run"):
        m.step(other, token, fwd_hooks=hooks)  # reused from the run above


def test_record_z_teacher_forced_matches_a_plain_run(gqa_model, random_ids):
    m = gqa_model
    ids = random_ids(N, seed=13)
    rec = record_z(m, ids[:, :-2], ["1.1"], tokens=ids[0, -2:], phase="all")
    ref = m.head_outputs(ids, list(range(N)))[0]  # [layer, pos, head, d_head]
    torch.testing.assert_close(rec.z("1.1", "prefill")[0], ref[1, : N - 2, 1], atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.z("1.1")[0], ref[1, N - 2 :, 1], atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.tokens, ids[:, -2:])


def test_gqa_kv_group(gqa_model, llama_model):
    assert kv_group(gqa_model, ["1.1"]) == [Head(1, 2), Head(1, 3)]
    assert kv_group(gqa_model, "0.0,1.1") == [Head(0, 0), Head(0, 1), Head(1, 2), Head(1, 3)]
    assert kv_group(llama_model, ["1.3"]) == [Head(1, 3)]
    with pytest.raises(ValueError, match="kv heads 0-1"):
        kv_group(gqa_model, ["1.2"])


def test_gqa_ablating_one_query_head_spares_its_kv_partner(gqa_model, random_ids):
    """Heads 1.2 and 1.3 share kv head 1: ablating 1.2's query leaves 1.3 as it was."""
    m = gqa_model
    ids = random_ids(N, seed=14)
    base, _ = run(m, ids, None, "decode")
    got, _ = run(m, ids, Ablation(["1.2"], "uniform", model=m), "decode")
    torch.testing.assert_close(got(1, "z")[:, :, 3], base(1, "z")[:, :, 3], atol=TOL, rtol=0)
    row = got(1, "pattern")[0, 2, 0]
    torch.testing.assert_close(row, torch.full((N,), 1 / N), atol=1e-6, rtol=0)


def test_no_heads_is_a_no_op(llama_model):
    abl = Ablation([], "uniform", model=llama_model)
    assert abl.prefill_hooks(llama_model) == [] and abl.decode_hooks(llama_model) == []


# ---- mean_head_z -----------------------------------------------------------------------------


def test_mean_head_z(llama_model, random_ids):
    m = llama_model
    a, b = random_ids(6, seed=15), random_ids(9, seed=16, batch=2)
    all_z = [m.head_outputs(row, list(range(row.shape[0])))[0] for row in (a[0], b[0], b[1])]
    expected = torch.cat(all_z, dim=1).mean(dim=1)  # [layer, head, d_head]
    torch.testing.assert_close(mean_head_z(m, [a, b]), expected, atol=ATOL, rtol=0)
    last = torch.stack([z[:, -1] for z in all_z]).mean(0)
    torch.testing.assert_close(mean_head_z(m, [a, b], positions="last"), last, atol=ATOL, rtol=0)
    part = mean_head_z(m, [a], heads=["1.2"])
    assert torch.isnan(part).sum() == (m.n_layers * m.n_heads - 1) * m.d_head
    with pytest.raises(ValueError, match="not finite for heads 1.1"):
        Ablation(["1.1"], "mean", mean_z=part)


# ---- activation patching ---------------------------------------------------------------------


def corrupted(ids: torch.Tensor, pos: int) -> torch.Tensor:
    out = ids.clone()
    out[0, pos] = 4 + (out[0, pos] - 4 + 37) % 100  # another plain word
    return out


@pytest.mark.parametrize("kind", ["llama", "gqa"])
def test_patch_heads_matches_transformer_lens_patching(request, random_ids, kind):
    from transformer_lens import patching

    m = request.getfixturevalue(f"{kind}_model")
    clean = random_ids(N, seed=17)
    corrupt = corrupted(clean, 4)
    answer, wrong = 30, 31
    got = patch_heads(m, clean, corrupt, answer, wrong)

    def ld(logits):
        return logits[0, -1, answer] - logits[0, -1, wrong]

    _, cache = m.bridge.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_z"))
    clean_ld, corrupt_ld = ld(m.logits(clean)), ld(m.logits(corrupt))
    tl = patching.get_act_patch_attn_head_out_all_pos(m.bridge, corrupt, cache, ld)
    expected = (tl - corrupt_ld) / (clean_ld - corrupt_ld)
    assert got.shape == (m.n_layers, m.n_heads)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


def test_patching_a_run_into_itself_changes_nothing(gqa_model, random_ids):
    m = gqa_model
    ids = random_ids(N, seed=18)
    run_ = patched_logits(m, ids, ids)
    assert run_.patched.shape == (m.n_layers, m.n_heads, m.d_vocab)
    torch.testing.assert_close(run_.corrupt, run_.clean, atol=0, rtol=0)
    torch.testing.assert_close(run_.patched, run_.clean.expand_as(run_.patched), atol=ATOL, rtol=0)
    with pytest.warns(RuntimeWarning, match="undefined"):
        recovery = patch_heads(m, ids, ids, 30, 31)
    assert recovery.isnan().all()


def test_patching_a_subset_in_small_batches(llama_model, random_ids):
    m = llama_model
    clean = random_ids(N, seed=19)
    corrupt = corrupted(clean, 2)
    full = patch_heads(m, clean, corrupt, 30, 31)
    part = patch_heads(m, clean, corrupt, 30, 31, heads=["1.3", "0.1", "1.0"], batch_size=1)
    chosen = torch.zeros_like(full, dtype=torch.bool)
    chosen[1, 3] = chosen[0, 1] = chosen[1, 0] = True
    torch.testing.assert_close(part[chosen], full[chosen], atol=1e-4, rtol=1e-4)
    assert part[~chosen].isnan().all()


def test_patching_errors(llama_model, random_ids):
    m = llama_model
    with pytest.raises(ValueError, match="same length.*10 and 9"):
        patch_heads(m, random_ids(10), random_ids(9), 30, 31)
    with pytest.raises(ValueError, match="answer_token"):
        patch_heads(m, random_ids(5), random_ids(5), m.d_vocab, 31)
    with pytest.raises(ValueError, match="batch of 1.*patched_logits_batch"):
        patch_heads(m, random_ids(5, batch=2), random_ids(5, batch=2), 30, 31)


# Several pairs at once must give each pair what it gets alone: the logits within float32
# rounding (ATOL); a recovery is a difference of such logits over the clean-corrupt difference
# (above 0.05 for these pairs, checked), so ~1e-6 of rounding in the logits moves it by less
# than ~2e-5: within ATOL plus 1e-4 of its size. On one CPU thread they agree to the bit.
REL = 1e-4


@pytest.mark.parametrize("kind", ["llama", "gqa"])
@pytest.mark.parametrize("batch_size", [None, 3], ids=["one-pass", "3-copies"])
def test_pairs_in_a_batch_give_each_pair_its_own_patching(request, random_ids, kind, batch_size):
    m = request.getfixturevalue(f"{kind}_model")
    clean = random_ids(N, seed=21, batch=3)
    corrupt = torch.cat([corrupted(clean[p : p + 1], 2 + p) for p in range(3)])
    answers, wrongs = [30, 41, 52], [31, 40, 60]
    heads = None if batch_size is None else ["0.1", "1.0", "1.3"]  # 3 copies cut across pairs
    runs = patched_logits_batch(m, clean, corrupt, heads, batch_size=batch_size)
    recovery = patch_heads_batch(m, clean, corrupt, answers, wrongs, heads, batch_size=batch_size)
    assert len(runs) == 3 and recovery.shape == (3, m.n_layers, m.n_heads)
    for p in range(3):
        alone = patched_logits(m, clean[p : p + 1], corrupt[p : p + 1], heads)
        for name in ("clean", "corrupt", "patched"):
            torch.testing.assert_close(
                getattr(runs[p], name), getattr(alone, name), atol=ATOL, rtol=0, equal_nan=True
            )
        assert runs[p].heads == alone.heads
        ld = alone.clean[answers[p]] - alone.clean[wrongs[p]]
        assert abs(ld - (alone.corrupt[answers[p]] - alone.corrupt[wrongs[p]])) > 0.05
        one = patch_heads(m, clean[p : p + 1], corrupt[p : p + 1], answers[p], wrongs[p], heads)
        torch.testing.assert_close(recovery[p], one, atol=ATOL, rtol=REL, equal_nan=True)
        assert recovery[p].isnan().sum() == (0 if heads is None else m.n_layers * m.n_heads - 3)


def test_a_batch_of_pairs_refuses_what_cannot_pair(gqa_model, random_ids):
    m = gqa_model
    ids = random_ids(6, batch=2)
    with pytest.raises(ValueError, match="one corrupted prompt per clean one: got 2 clean and 1"):
        patched_logits_batch(m, ids, ids[:1])
    with pytest.raises(ValueError, match="same length.*6 and 5"):
        patched_logits_batch(m, ids, ids[:, :5])
    with pytest.raises(ValueError, match="got 2 pairs, 1 answer and 2 wrong tokens"):
        patch_heads_batch(m, ids, ids, [30], [31, 32])
    with pytest.raises(ValueError, match="wrong_token"):
        patch_heads_batch(m, ids, ids, [30, 30], [31, m.d_vocab])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        patched_logits_batch(m, ids, ids, batch_size=0)
    with pytest.warns(RuntimeWarning, match="pairs 0, 1: .*undefined"):
        assert patch_heads_batch(m, ids, ids, [30, 30], [31, 31]).isnan().all()


# ---- errors that need a model ----------------------------------------------------------------


def test_errors_against_the_model(llama_model, gqa_model, random_ids):
    with pytest.raises(ValueError, match="out of range"):
        Ablation(["2.0"], "zero", model=llama_model)
    with pytest.raises(ValueError, match="out of range"):
        ablate(llama_model, "1.4", "uniform")
    abl = Ablation(["1.5"], "zero")  # no model: checked when hooks are built
    with pytest.raises(ValueError, match="out of range"):
        abl.decode_hooks(llama_model)
    with pytest.raises(ValueError, match="the model needs"):
        Ablation(["0.0"], "mean", mean_z=torch.zeros(2, 4, 8), model=llama_model)
    rec = record_z(llama_model, random_ids(5), ["1.0"], n_steps=1)
    with pytest.raises(ValueError, match="lacks heads 1.1"):
        Ablation(["1.1"], "resample", resample=rec)
    with pytest.raises(ValueError, match="phase='all'"):
        Ablation(["1.0"], "resample", "all", resample=rec)
    short = record_z(llama_model, random_ids(5), ["1.0"], n_steps=1, phase="all")
    abl = Ablation(["1.0"], "resample", "all", resample=short, model=llama_model)
    with pytest.raises(ValueError, match="equal length"):
        llama_model.prefill(random_ids(8), fwd_hooks=abl.prefill_hooks(llama_model))
    assert ablate(gqa_model, "1.1, 1.1,0.2", "zero").heads == [Head(0, 2), Head(1, 1)]
