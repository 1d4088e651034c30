"""Per-trial interventions stacked into one for a batch (no model needed).

``RecordedZ.stack`` (shapes, padding, refusals), ``Ablation.stack`` and ``stack_interventions``
(what stacks, what falls back to one by one), ``trial_independent`` of one recording or one set
of positions, and the knockout hook with per-row positions against each row's own hook.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from retrieval_heads import Head
from retrieval_heads.head_hooks import _blocked_mask, _empty_rows_hook, _Index, _knockout_hook
from retrieval_heads.intervention import UserIntervention, stack_interventions
from retrieval_heads.interventions import (
    KnockoutAblation,
    MeanAblation,
    RecordedZ,
    ResampleAblation,
    UniformAblation,
    ZeroAblation,
)
from retrieval_heads.kvcache import KVPolicy

HEADS = [Head(0, 1), Head(1, 0), Head(1, 2)]  # layer 0: one column, layer 1: two
D_HEAD = 4


def recording(seed: int, steps: int, prompt: int = 0, batch: int = 1) -> RecordedZ:
    """A made-up recording of ``HEADS``: ``steps`` decode steps (and ``prompt`` positions)."""
    gen = torch.Generator().manual_seed(seed)

    def z(n: int, k: int) -> torch.Tensor:
        return torch.randn(batch, n, k, D_HEAD, generator=gen)

    prefill = {0: z(prompt, 1), 1: z(prompt, 2)} if prompt else {}
    tokens = torch.arange(batch * steps).reshape(batch, steps)
    return RecordedZ(list(HEADS), prefill, {0: z(steps, 1), 1: z(steps, 2)}, tokens, None)


def test_recorded_z_stack_concatenates_rows_and_pads_the_shorter_steps_with_zeros():
    a, b, c = recording(1, 3, prompt=5), recording(2, 5, prompt=5), recording(3, 4, prompt=5)
    stacked = RecordedZ.stack([a, b, c])
    assert stacked.batch == 3 and stacked.n_steps == 5 and stacked.prompt_length == 5
    assert stacked.decode[1].shape == (3, 5, 2, D_HEAD)
    for row, rec in enumerate((a, b, c)):
        n = rec.n_steps
        torch.testing.assert_close(stacked.decode[1][row, :n], rec.decode[1][0], atol=0, rtol=0)
        assert stacked.decode[1][row, n:].abs().sum() == 0  # padding: zeros
        torch.testing.assert_close(stacked.prefill[0][row], rec.prefill[0][0], atol=0, rtol=0)
        for head in HEADS:
            got = stacked.z(head)[row, :n]
            torch.testing.assert_close(got, rec.z(head)[0], atol=0, rtol=0)
    assert stacked.tokens is None  # tokens of other lengths are not padded
    same = RecordedZ.stack([a, recording(4, 3, prompt=5, batch=2)])
    assert same.batch == 3 and same.tokens.shape == (3, 3)  # rows of each, in order


def test_recorded_z_stack_refuses_what_one_batch_cannot_replay():
    with pytest.raises(ValueError, match="no recordings"):
        RecordedZ.stack([])
    fewer = RecordedZ([HEADS[1]], {}, {1: torch.zeros(1, 3, 1, D_HEAD)})
    with pytest.raises(ValueError, match="other heads"):
        RecordedZ.stack([recording(1, 3), fewer])
    with pytest.raises(ValueError, match="other phases"):
        RecordedZ.stack([recording(1, 3), recording(2, 3, prompt=5)])
    with pytest.raises(ValueError, match="prompts of 5 and 6 tokens"):
        RecordedZ.stack([recording(1, 3, prompt=5), recording(2, 3, prompt=6)])
    wide = recording(2, 3)
    wide.decode = {
        layer: torch.zeros(*z.shape[:-1], D_HEAD + 1) for layer, z in wide.decode.items()
    }
    with pytest.raises(ValueError, match="do not stack"):
        RecordedZ.stack([recording(1, 3), wide])


def test_one_recording_or_one_set_of_positions_treats_every_row_alike():
    assert ResampleAblation(HEADS, recording(1, 3)).trial_independent
    assert not ResampleAblation(HEADS, recording(1, 3, batch=2)).trial_independent
    assert KnockoutAblation(HEADS, [3, 4]).trial_independent
    assert KnockoutAblation(HEADS, rows=[[3, 4]]).trial_independent  # one row: every row
    per_row = KnockoutAblation(HEADS, rows=[[3, 4], [7]])
    assert not per_row.trial_independent
    assert per_row.rows == ((3, 4), (7,)) and per_row.blocked_positions == (3, 4, 7)
    assert per_row.describe()["rows"] == [[3, 4], [7]]
    assert "rows" not in KnockoutAblation(HEADS, [3]).describe()
    with pytest.raises(ValueError, match="KnockoutAblation needs blocked_positions"):
        KnockoutAblation(HEADS, [3], rows=[[3]])
    with pytest.raises(ValueError, match="empty"):
        KnockoutAblation(HEADS, rows=[[3], []])


def test_per_trial_ablations_stack_row_by_row():
    resample = [
        ResampleAblation(HEADS, recording(s, 2 + s, prompt=5), phase="all") for s in (1, 2, 3)
    ]
    stacked = stack_interventions(resample)
    assert type(stacked) is ResampleAblation and stacked.phase == "all"
    assert stacked.resample.batch == 3 and stacked.resample.n_steps == 5
    assert not stacked.trial_independent
    for row, part in enumerate(resample):
        torch.testing.assert_close(
            stacked.resample.prefill[1][row], part.resample.prefill[1][0], atol=0, rtol=0
        )
    # decode-phase replays never read the prompt: prompts of other lengths stack
    decode = [ResampleAblation(HEADS, recording(s, 3, prompt=4 + s)) for s in (1, 2)]
    assert stack_interventions(decode).resample.prefill == {}

    knock = [KnockoutAblation(HEADS, range(a, a + 3)) for a in (2, 9, 2)]
    stacked = stack_interventions(knock)
    assert stacked.rows == ((2, 3, 4), (9, 10, 11), (2, 3, 4))
    assert stack_interventions([knock[0], KnockoutAblation(HEADS, [4, 3, 2])]) is knock[0]


def test_what_cannot_share_a_batch_runs_one_by_one():
    knock = KnockoutAblation(HEADS, [2])
    assert stack_interventions([knock, KnockoutAblation(HEADS[:2], [3])]) is None  # heads
    assert stack_interventions([knock, KnockoutAblation(HEADS, [3], phase="all")]) is None
    assert stack_interventions([knock, ZeroAblation(HEADS)]) is None  # classes
    assert stack_interventions([KnockoutAblation(HEADS, rows=[[2], [3]]), knock]) is None
    several = ResampleAblation(HEADS, recording(1, 3, batch=2))
    assert stack_interventions([several, ResampleAblation(HEADS, recording(2, 3))]) is None
    other_prompts = [
        ResampleAblation(HEADS, recording(s, 3, prompt=4 + s), phase="all") for s in (1, 2)
    ]
    assert stack_interventions(other_prompts) is None  # phase "all" replays both prompts
    mean_z = torch.zeros(2, 3, D_HEAD)
    means = [MeanAblation(HEADS, mean_z), MeanAblation(HEADS, mean_z.clone())]
    assert stack_interventions(means) is means[0]  # equal data: one ablation
    assert stack_interventions([means[0], MeanAblation(HEADS, mean_z + 1)]) is None
    uniform = [UniformAblation(HEADS), UniformAblation(HEADS)]
    assert stack_interventions(uniform) is uniform[0]
    # no stack method: only the very same trial-independent intervention shares a batch
    policy = KVPolicy(frozenset({(0, 0)}))
    assert stack_interventions([policy, policy]) is policy
    assert stack_interventions([policy, KVPolicy(frozenset({(0, 0)}))]) is None
    per_trial = UserIntervention(decode=lambda model, trial: [])
    assert stack_interventions([per_trial, per_trial]) is None
    with pytest.raises(ValueError, match="no interventions"):
        stack_interventions([])


def fake_scores(batch: int, n_queries: int, n_keys: int, seed: int = 0) -> torch.Tensor:
    """Attention scores ``[batch, head, query, key]`` with the causal mask (finfo.min) as the
    model gives them: the queries are the last ``n_queries`` positions."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, 3, n_queries, n_keys, generator=gen)
    queries = torch.arange(n_keys - n_queries, n_keys)[:, None]
    future = torch.arange(n_keys)[None, :] > queries
    return scores.masked_fill(future, torch.finfo(scores.dtype).min)


@pytest.mark.parametrize("n_queries, offset", [(6, 0), (1, 5), (3, 9)], ids=str)
def test_the_stacked_knockout_hook_gives_each_row_its_own_hook(n_queries, offset):
    """Prefill (chunks) and decode steps: row ``i`` under the per-row mask is row ``i`` under
    its own positions, the pattern included (a query whose visible keys are all blocked: 0)."""
    rows = [[0, 1], [4, 5, 30], [2], [11, 12]]
    n_keys = offset + n_queries
    model = SimpleNamespace(position_offset=offset)
    idx = _Index([0, 2])
    scores = fake_scores(len(rows), n_queries, n_keys)
    batched = _knockout_hook(model, idx, _blocked_mask(rows))(scores, None)
    pattern = _empty_rows_hook(idx)(batched.softmax(-1), None)
    assert torch.isfinite(pattern).all()
    for r, row in enumerate(rows):
        own = _knockout_hook(model, idx, _blocked_mask([row]))(scores[r : r + 1], None)
        own = scores[r : r + 1] if own is None else own  # none of its keys visible yet
        # the same scores, but the causal mask may be -inf in the batch (both weigh 0)
        low = torch.finfo(scores.dtype).min
        assert torch.equal(batched[r : r + 1].clamp(min=low), own.clamp(min=low)), r
        alone = _empty_rows_hook(idx)(own.softmax(-1), None)
        assert torch.equal(pattern[r : r + 1], alone), r
        visible = [p for p in row if p < n_keys]  # key j is position j here
        assert pattern[r, [0, 2]][..., visible].abs().sum() == 0
        assert torch.equal(pattern[r, 1], scores[r, 1].softmax(-1))  # an untouched head
    if offset == 0:  # query 0 sees only key 0, which row 0 blocks: it attends nowhere
        assert pattern[0, 0, 0].abs().max() == 0 and pattern[0, 1, 0].sum() == 1


def test_the_knockout_hook_refuses_a_batch_of_other_rows():
    hook = _knockout_hook(
        SimpleNamespace(position_offset=0), _Index([0]), _blocked_mask([[0], [1]])
    )
    with pytest.raises(ValueError, match="for 2 rows, the run has 3"):
        hook(fake_scores(3, 4, 4), None)
    with pytest.raises(ValueError, match="for 2 rows, the run has 1"):
        hook(fake_scores(1, 4, 4), None)
    assert hook(fake_scores(2, 4, 4), None) is not None
