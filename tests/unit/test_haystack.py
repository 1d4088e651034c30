"""Trial construction on real (offline) tokenizers: spans, lengths, boundaries, ids, bad input."""

from __future__ import annotations

import json
import math
import re
import time
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval_heads.tiny.trials import tiny_haystack, tiny_needle_sets, tiny_needles, tiny_template
from retrieval_heads.trials.base import TrialError
from retrieval_heads.trials.builder import BoundaryFallbackWarning, build_trial
from retrieval_heads.trials.grid import (
    default_lengths,
    linspace_depths,
    linspace_lengths,
    make_grid,
)
from retrieval_heads.trials.haystacks import Haystack
from retrieval_heads.trials.needles import (
    Needle,
    NeedleSet,
    default_needles,
    key_value_needles,
    load_needles,
)
from retrieval_heads.trials.template import PromptTemplate
from retrieval_heads.trials.trial import Trial

NEEDLES = default_needles()
MAGIC = next(n for n in NEEDLES if n.needle_id == "magic-number")
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def canon(text: str) -> str:
    return re.sub(r"[\s\u2581]+", "", text).casefold()


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def ends_sentence(tok, token_id: int) -> bool:
    return bool(re.search(r"[.!?][\"')\]]*$", decode(tok, [token_id]).rstrip()))


def check_trial(tok, trial: Trial, length: int) -> None:
    """The invariants every trial must satisfy."""
    ids = trial.input_ids
    assert len(ids) == length == trial.context_length
    c0, c1 = trial.context_span
    spans = sorted(p.span for p in trial.needles)
    for (_, e0), (s1, _) in zip(spans, spans[1:], strict=False):
        assert e0 <= s1, "needle spans overlap"
    for placed in trial.needles:
        s, e = placed.span
        a, b = placed.answer_span
        assert c0 <= s < e <= c1
        assert s <= a < b <= e
        assert canon(decode(tok, ids[s:e])) == canon(placed.needle.text)
        assert canon(decode(tok, ids[a:b])) == canon(placed.needle.answer)
        assert 0.0 <= placed.depth_percent <= 100.0
        if trial.boundary == "sentence":  # at the context start or right after a sentence end
            assert (
                s == c0
                or ends_sentence(tok, ids[s - 1])
                or ids[s - 1] in {i for p in trial.needles for i in ids[p.span[0] : p.span[1]]}
            )
    assert trial.answer == ", ".join(trial.answers)
    assert trial.answer_span == trial.target.answer_span
    json.dumps(trial.params)  # JSON-serialisable


# --- the four tokenizer families -----------------------------------------------------------------


def test_basic_trial_on_each_tokenizer(any_tokenizer):
    trial = build_trial(any_tokenizer, Haystack.filler(), MAGIC, length=600, depth_percent=50)
    check_trial(any_tokenizer, trial, 600)
    assert trial.boundary == "sentence"
    assert decode(any_tokenizer, trial.input_ids[slice(*trial.answer_span)]).strip() == "7083419"
    assert trial.target.role == "target" and trial.answer == "7083419"
    assert trial.depth_percent == 50.0 and 0 <= trial.target.depth_percent <= 50.0 + 1e-9


def test_bos_is_included_and_counted(any_tokenizer):
    bos = any_tokenizer.encode("a")[: -len(any_tokenizer.encode("a", add_special_tokens=False))]
    trial = build_trial(any_tokenizer, Haystack.filler(), MAGIC, length=300, depth_percent=10)
    assert list(trial.input_ids[: len(bos)]) == bos
    assert len(trial.input_ids) == 300
    if any_tokenizer.name_or_path in ("test-sp", "test-llama"):
        assert bos == [any_tokenizer.bos_token_id]
        assert trial.input_ids.count(any_tokenizer.bos_token_id) == 1
    else:
        assert bos == []


def test_depth_extremes(any_tokenizer):
    hay = Haystack.filler()
    first = build_trial(any_tokenizer, hay, MAGIC, length=400, depth_percent=0)
    last = build_trial(any_tokenizer, hay, MAGIC, length=400, depth_percent=100)
    assert first.target.span[0] == first.context_span[0] and first.target.depth_percent == 0.0
    # The window ends at a sentence end, so depth 100 puts the needle last in the context.
    assert last.target.span[1] == last.context_span[1] and last.target.depth_percent == 100.0
    assert first.trial_id != last.trial_id


def test_pieces_tokenize_like_the_whole_prompt(any_tokenizer):
    """Tokenizing needle, haystack and template apart gives the ids of the whole prompt's text
    (here; not guaranteed at every junction for every tokenizer, which is why spans are exact)."""
    tok = any_tokenizer
    trial = build_trial(tok, Haystack.filler(), MAGIC, length=600, depth_percent=50)
    text = decode(tok, trial.input_ids)
    if tok.bos_token:
        text = text.removeprefix(tok.bos_token).removeprefix(" ")
    assert tok.encode(text) == list(trial.input_ids)


def test_question_follows_a_whole_sentence(bpe_tok):
    trial = build_trial(bpe_tok, Haystack.filler(), MAGIC, length=500, depth_percent=30, seed=4)
    assert ends_sentence(bpe_tok, trial.input_ids[trial.context_span[1] - 1])


# --- property tests ------------------------------------------------------------------------------


@SETTINGS
@given(
    length=st.integers(min_value=400, max_value=1500),
    depth=st.floats(min_value=0, max_value=100, allow_nan=False),
    n_distractors=st.integers(min_value=0, max_value=3),
    seed=st.integers(min_value=0, max_value=3),
    which=st.integers(min_value=0, max_value=len(NEEDLES) - 1),
)
def test_properties(any_tokenizer, length, depth, n_distractors, seed, which):
    tok, hay = any_tokenizer, Haystack.filler()
    target = NEEDLES[which]
    others = [n for n in NEEDLES if n is not target][:n_distractors]
    trial = build_trial(
        tok, hay, target, length=length, depth_percent=depth, distractors=others, seed=seed
    )
    check_trial(tok, trial, length)
    assert [p.role for p in trial.needles] == ["target"] + ["distractor"] * n_distractors
    assert trial.boundary == "sentence"  # the filler has sentence ends everywhere

    # The target sits at the last sentence start at or before the requested depth.
    c0, c1 = trial.context_span
    hay_ids = list(trial.input_ids[c0:c1])
    placed = sorted(trial.needles, key=lambda p: p.span[0])
    removed = 0
    for p in placed:  # remove needles to recover the haystack window
        s, e = p.span[0] - c0 - removed, p.span[1] - c0 - removed
        if p.role == "target":
            at = s
        del hay_ids[s:e]
        removed += e - s
    wanted = depth / 100 * len(hay_ids)
    assert at <= wanted + 1e-9
    for i in range(at + 1, math.floor(wanted + 1e-9) + 1):
        prev, cur = hay_ids[i - 1], hay_ids[i] if i < len(hay_ids) else None
        if cur is not None and ends_sentence(tok, prev):
            junction = decode(tok, [prev, cur])[len(decode(tok, [prev])) :]
            assert not junction[:1].isspace(), f"sentence start at {i} is nearer to the depth"

    # Same parameters, same trial; any changed parameter, another id.
    again = build_trial(
        tok, hay, target, length=length, depth_percent=depth, distractors=others, seed=seed
    )
    assert again == trial and again.trial_id == trial.trial_id
    changed = [
        build_trial(tok, hay, target, length=length + 1, depth_percent=depth, distractors=others),
        build_trial(tok, hay, target, length=length, depth_percent=(depth + 7) % 100),
        build_trial(tok, hay, target, length=length, depth_percent=depth, seed=seed + 10),
    ]
    ids = {trial.trial_id} | {t.trial_id for t in changed}
    assert len(ids) == 4


@SETTINGS
@given(
    length=st.integers(min_value=250, max_value=1200),
    depth=st.floats(min_value=0, max_value=100, allow_nan=False),
    kind=st.sampled_from(["single", "multikey", "multivalue", "multiquery"]),
    seed=st.integers(min_value=0, max_value=5),
)
def test_properties_key_value_needles(bpe_tok, sp_tok, llama_tok, length, depth, kind, seed):
    needle_set = key_value_needles(1, seed=seed, kind=kind, n_values=3, n_queries=3)[0]
    for tok in (bpe_tok, sp_tok, llama_tok):
        trial = build_trial(
            tok, Haystack.filler(), needle_set, length=length, depth_percent=depth, seed=seed
        )
        check_trial(tok, trial, length)
        assert trial.question == needle_set.question
        assert [p.needle for p in trial.targets] == list(needle_set.targets)
        assert [p.needle for p in trial.distractors] == list(needle_set.distractors)
        assert trial.params["kind"] == kind


# --- needles and their variants ------------------------------------------------------------------


def test_key_value_needle_kinds():
    single = key_value_needles(3, seed=1)
    assert all(len(s.targets) == 1 and not s.distractors for s in single)
    multikey = key_value_needles(2, seed=1, kind="multikey", n_distractors=4)
    for s in multikey:
        keys = {n.question for n in (*s.targets, *s.distractors)}
        assert len(keys) == 5, "distractors must use other keys"
        assert len({n.answer for n in (*s.targets, *s.distractors)}) == 5
    multivalue = key_value_needles(1, seed=1, kind="multivalue", n_values=4)[0]
    assert len(multivalue.targets) == 4 and len({n.question for n in multivalue.targets}) == 1
    assert "all" in multivalue.question
    multiquery = key_value_needles(1, seed=1, kind="multiquery", n_queries=3)[0]
    assert len({n.question for n in multiquery.targets}) == 3
    assert key_value_needles(2, seed=1, kind="multikey") == multikey[:0] + key_value_needles(
        2, seed=1, kind="multikey", n_distractors=3
    )
    assert key_value_needles(3, seed=1) == single  # seeded
    with pytest.raises(TrialError, match="kind"):
        key_value_needles(1, kind="bogus")


def test_multi_target_trial_from_a_list(bpe_tok):
    a, b = NEEDLES[0], NEEDLES[1]
    trial = build_trial(bpe_tok, Haystack.filler(), [a, b], length=700, depth_percent=40)
    check_trial(bpe_tok, trial, 700)
    assert [p.needle for p in trial.targets] == [a, b]
    assert trial.target.needle == a
    assert trial.answers == [a.answer, b.answer]
    assert trial.question == f"{a.question} {b.question}"
    custom = build_trial(
        bpe_tok, Haystack.filler(), [a, b], length=700, depth_percent=40, question="Both?"
    )
    assert custom.question == "Both?" and custom.trial_id != trial.trial_id


def test_distractors_at_distinct_sentence_boundaries(bpe_tok):
    trial = build_trial(
        bpe_tok,
        Haystack.filler(),
        MAGIC,
        length=1500,
        depth_percent=60,
        distractors=NEEDLES[:3],
        seed=2,
    )
    check_trial(bpe_tok, trial, 1500)
    starts = [p.span[0] for p in trial.needles]
    assert len(set(starts)) == 4
    for p in trial.needles:  # no two needles are adjacent: distinct boundaries
        assert all(p.span[1] != q.span[0] for q in trial.needles)
    # Other seeds move the distractors (and the haystack window); the target stays in the trial.
    moved = build_trial(
        bpe_tok,
        Haystack.filler(),
        MAGIC,
        length=1500,
        depth_percent=60,
        distractors=NEEDLES[:3],
        seed=3,
    )
    check_trial(bpe_tok, moved, 1500)
    assert moved.trial_id != trial.trial_id
    assert [(p.needle, p.role) for p in moved.needles] == [
        (p.needle, p.role) for p in trial.needles
    ]
    assert moved.params["haystack_offset"] != trial.params["haystack_offset"]
    for before, after in zip(trial.distractors, moved.distractors, strict=True):
        assert after.span != before.span, f"{after.needle.needle_id} did not move"
    ids = moved.input_ids
    assert decode(bpe_tok, ids[slice(*moved.answer_span)]).strip() == MAGIC.answer
    assert canon(decode(bpe_tok, ids[slice(*moved.target.span)])) == canon(MAGIC.text)

    # With the window pinned (max_offset=0) the seed moves only the distractors: same haystack,
    # target at the same span, every distractor somewhere else.
    pinned = [
        build_trial(
            bpe_tok,
            Haystack.filler(),
            MAGIC,
            length=1500,
            depth_percent=60,
            distractors=NEEDLES[:3],
            seed=seed,
            max_offset=0,
        )
        for seed in (2, 3)
    ]
    a, b = pinned
    assert a.params["haystack_offset"] == b.params["haystack_offset"]
    assert a.target.span == b.target.span and a.target.needle == b.target.needle == MAGIC
    for before, after in zip(a.distractors, b.distractors, strict=True):
        assert after.needle == before.needle and after.span != before.span

    # The haystack tokens around the needles are the same; only the needles' places changed.
    def haystack_only(t):
        inside = {i for p in t.needles for i in range(*p.span)}
        return [x for i, x in enumerate(t.input_ids) if i not in inside]

    assert haystack_only(a) == haystack_only(b)
    assert a.input_ids != b.input_ids


# --- haystack sources ----------------------------------------------------------------------------


def test_haystack_sources(tmp_path, bpe_tok, sp_tok):
    (tmp_path / "a.txt").write_text("Apples grow on trees. Pears do too.\n\nPlums are purple.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("Boats float on water. Ships are bigger.")
    (tmp_path / "ignored.md").write_text("Not text.")
    directory = Haystack.from_path(tmp_path)
    assert list(directory.texts()) == [
        "Apples grow on trees. Pears do too.\n\nPlums are purple.",
        "Boats float on water. Ships are bigger.",
    ]
    assert list(directory.sentences())[:3] == [
        "Apples grow on trees.",
        "Pears do too.",
        "Plums are purple.",
    ]
    one = Haystack.from_path(tmp_path / "a.txt")
    assert len(list(one.texts())) == 1
    strings = Haystack.from_strings(["One sentence here.", "Another one there."])
    assert list(strings.sentences()) == ["One sentence here.", "Another one there."]
    assert Haystack.from_strings(["x."]).name == Haystack.from_strings(["x."]).name

    def endless():
        i = 0
        while True:
            yield f"Line number {i} says hello."
            i += 1

    generated = Haystack.from_generator(endless, name="endless")
    once = Haystack.from_generator(iter(["A short one.", "Then another.", "And a third."]))
    for hay in (directory, one, strings, generated, once):
        for tok in (bpe_tok, sp_tok):  # a one-shot iterator must serve a second tokenizer too
            trial = build_trial(tok, hay, MAGIC, length=300, depth_percent=50)
            check_trial(tok, trial, 300)
            assert trial.params["haystack"] == hay.name


def test_big_files_are_read_in_paragraph_blocks(tmp_path, monkeypatch, bpe_tok):
    import retrieval_heads.trials.haystacks as module

    monkeypatch.setattr(module, "_BLOCK_CHARS", 40)
    paragraphs = [f"Paragraph {i} is here. It has two sentences." for i in range(6)]
    (tmp_path / "big.txt").write_text("\n\n".join(paragraphs))
    hay = Haystack.from_path(tmp_path / "big.txt")
    blocks = list(hay.texts())
    assert len(blocks) == 6 and blocks[0] == paragraphs[0]
    check_trial(bpe_tok, build_trial(bpe_tok, hay, MAGIC, length=300, depth_percent=40), 300)


def test_sentence_splitting():
    hay = Haystack.from_strings(['He said "Stop." Then he left! Why? Pi is 3.14 or so', "Last."])
    assert list(hay.sentences()) == [
        'He said "Stop."',
        "Then he left!",
        "Why?",
        "Pi is 3.14 or so",
        "Last.",
    ]


def test_small_haystack_repeats(bpe_tok):
    hay = Haystack.from_strings(["The sun rose.", "The birds sang."])
    trial = build_trial(bpe_tok, hay, MAGIC, length=400, depth_percent=70, seed=1)
    check_trial(bpe_tok, trial, 400)
    text = decode(bpe_tok, trial.input_ids)
    assert text.count("The birds sang.") > 10


def test_builtin_haystacks_are_shared():
    assert Haystack.filler() is Haystack.filler()
    words = sum(len(s.split()) for s in Haystack.filler().sentences())
    assert words > 4000


def test_no_sentence_boundary_falls_back_to_token_boundary(bpe_tok):
    hay = Haystack.from_strings(["lorem ipsum dolor sit amet " * 300], name="unpunctuated")
    with pytest.warns(BoundaryFallbackWarning, match="unpunctuated"):
        trial = build_trial(bpe_tok, hay, MAGIC, length=400, depth_percent=50)
    assert trial.boundary == "token"
    check_trial(bpe_tok, trial, 400)
    c0, c1 = trial.context_span
    n_hay = c1 - c0 - (trial.target.span[1] - trial.target.span[0])
    assert trial.target.span[0] - c0 == math.floor(0.5 * n_hay)
    assert trial.target.depth_percent == pytest.approx(50, abs=100 / n_hay)
    with warnings.catch_warnings():  # depth 0 needs no boundary: the context start
        warnings.simplefilter("error")
        assert build_trial(bpe_tok, hay, MAGIC, length=400, depth_percent=0).boundary == "sentence"


def test_haystack_offset_is_seeded(bpe_tok):
    hay = Haystack.filler()
    offsets = {
        build_trial(bpe_tok, hay, MAGIC, length=300, depth_percent=50, seed=s).params[
            "haystack_offset"
        ]
        for s in range(5)
    }
    assert len(offsets) > 1
    pinned = {
        build_trial(bpe_tok, hay, MAGIC, length=300, depth_percent=50, seed=s, max_offset=0).params[
            "haystack_offset"
        ]
        for s in range(5)
    }
    assert len(pinned) == 1


def test_long_context_is_fast(bpe_tok):
    hay = Haystack.filler()
    build_trial(bpe_tok, hay, MAGIC, length=1000, depth_percent=50)  # warm the token cache
    started = time.perf_counter()
    trials = [
        build_trial(bpe_tok, hay, MAGIC, length=32768, depth_percent=d, distractors=NEEDLES[:2])
        for d in (0, 25, 50, 75, 100)
    ]
    elapsed = time.perf_counter() - started
    for trial in trials:
        assert len(trial.input_ids) == 32768
    check_trial(bpe_tok, trials[2], 32768)
    assert elapsed < 5, f"5 trials of 32K tokens took {elapsed:.1f}s"


# --- templates -----------------------------------------------------------------------------------


def test_templates(bpe_tok):
    paper = build_trial(
        bpe_tok,
        Haystack.filler(),
        MAGIC,
        length=300,
        depth_percent=50,
        template=PromptTemplate.paper(),
    )
    text = decode(bpe_tok, paper.input_ids)
    assert text.startswith("This is a very long story book: <book>")
    assert text.endswith(
        f"</book>.\nBased on the content of the book, Question: {MAGIC.question}\nAnswer:"
    )
    custom = PromptTemplate("Q: {question}\n{{literal}}\n{context}\nA:", name="question-first")
    trial = build_trial(
        bpe_tok, Haystack.filler(), MAGIC, length=300, depth_percent=50, template=custom
    )
    text = decode(bpe_tok, trial.input_ids)
    assert text.startswith(f"Q: {MAGIC.question}\n{{literal}}\n") and text.endswith("\nA:")
    check_trial(bpe_tok, trial, 300)
    with pytest.raises(TrialError, match="context"):
        PromptTemplate("no slots here")
    with pytest.raises(TrialError, match="other fields"):
        PromptTemplate("{context} {question} {extra}")


def test_chat_template(fresh_tokenizer, bpe_tok):
    tok = fresh_tokenizer("sp")
    tok.add_tokens(["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], special_tokens=True)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    template = PromptTemplate("{context}\n\nQuestion: {question}", chat=True, system="Be brief.")
    trial = build_trial(
        tok, Haystack.filler(), MAGIC, length=400, depth_percent=50, template=template
    )
    check_trial(tok, trial, 400)
    ids = trial.input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # the template's BOS
    assert ids[1] == tok.convert_tokens_to_ids("<|system|>")
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids[-3:]  # SentencePiece adds "▁\n"
    assert "chat_template_sha" in trial.params
    base = build_trial(tok, Haystack.filler(), MAGIC, length=400, depth_percent=50)
    assert base.trial_id != trial.trial_id
    with pytest.raises(TrialError, match="no.*chat template|has none"):
        build_trial(
            bpe_tok, Haystack.filler(), MAGIC, length=400, depth_percent=50, template=template
        )


# --- grid ----------------------------------------------------------------------------------------


def test_linspace():
    assert linspace_lengths(1000, 4000, 4) == [1000, 2000, 3000, 4000]
    assert linspace_lengths(100, 102, 10) == [100, 101, 102]
    assert linspace_lengths(500, 900, 1) == [500]
    assert linspace_depths(5) == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert linspace_depths(1) == [0.0]
    with pytest.raises(TrialError):
        linspace_lengths(10, 5, 3)
    with pytest.raises(TrialError):
        linspace_depths(0)


def test_default_lengths():
    # the experiment scripts' grid: 3 lengths, 6 or 24 tokens of room, the shortest ~1/5
    assert default_lengths(1024) == [200, 600, 1000]  # tiny
    assert default_lengths(256) == [64, 157, 250]  # tiny-short
    assert default_lengths(8192) == [1634, 4901, 8168]
    assert default_lengths(4096, max_length=1007) == [201, 604, 1007]  # 1007 / 5 rounds up
    # the command line's: 32 tokens of room, at most 32768, the shortest an eighth, floored
    cli = dict(room=32, shortest=8, floor=True, cap=32768)
    assert default_lengths(1024, 5, **cli) == [124, 341, 558, 775, 992]
    assert default_lengths(131072, 5, **cli) == [4092, 11253, 18414, 25575, 32736]
    assert default_lengths(4096, 5, max_length=1007, **cli)[0] == 125  # 1007 / 8 floors
    assert default_lengths(4096, 5, min_length=100, **cli) == [100, 1091, 2082, 3073, 4064]
    assert default_lengths(256, 5, **cli) == [64, 104, 144, 184, 224]  # at least 64


def test_make_grid(word_tok):
    hay = Haystack.filler()
    lengths, depths = [300, 400], linspace_depths(3)
    needles = NEEDLES[:3]
    grid = make_grid(
        word_tok, hay, needles, lengths=lengths, depths=depths, n_distractors=2, seed=1
    )
    assert len(grid) == 2 * 3 * 3
    order = [(t.context_length, t.depth_percent, t.target.needle.needle_id) for t in grid]
    assert order == [(n, d, x.needle_id) for n in lengths for d in depths for x in needles]
    assert len({t.trial_id for t in grid}) == len(grid)
    for trial in grid:
        check_trial(word_tok, trial, trial.context_length)
        assert len(trial.distractors) == 2
        assert trial.target.needle not in [p.needle for p in trial.distractors]
    # The same distractors for a needle at every length and depth.
    by_needle = {}
    for trial in grid:
        chosen = tuple(p.needle.needle_id for p in trial.distractors)
        by_needle.setdefault(trial.target.needle.needle_id, set()).add(chosen)
    assert all(len(v) == 1 for v in by_needle.values())
    again = make_grid(
        word_tok, hay, needles, lengths=lengths, depths=depths, n_distractors=2, seed=1
    )
    assert [t.trial_id for t in again] == [t.trial_id for t in grid]
    other = make_grid(
        word_tok, hay, needles, lengths=lengths, depths=depths, n_distractors=2, seed=2
    )
    assert not {t.trial_id for t in other} & {t.trial_id for t in grid}


def test_make_grid_errors(word_tok):
    hay = Haystack.filler()
    with pytest.raises(TrialError, match="repeated lengths"):
        make_grid(word_tok, hay, NEEDLES[:1], lengths=[300, 300], depths=[0])
    with pytest.raises(TrialError, match="repeated depths"):
        make_grid(word_tok, hay, NEEDLES[:1], lengths=[300], depths=[0, 0.0])
    with pytest.raises(TrialError, match="repeated needles"):
        make_grid(word_tok, hay, [NEEDLES[0], NEEDLES[0]], lengths=[300], depths=[0])
    with pytest.raises(TrialError, match="distractors"):
        make_grid(word_tok, hay, NEEDLES[:2], lengths=[300], depths=[0], n_distractors=2)
    with pytest.raises(TrialError, match="at least one"):
        make_grid(word_tok, hay, [], lengths=[300], depths=[0])


def test_make_grid_takes_distractors_from_the_pool(word_tok):
    """One target and two distractors: refused from the grid's own needles, served by the pool."""
    hay = Haystack.filler()
    with pytest.raises(TrialError, match="distractors"):
        make_grid(word_tok, hay, NEEDLES[:1], lengths=[300], depths=[0], n_distractors=2)
    grid = make_grid(
        word_tok,
        hay,
        NEEDLES[:1],
        lengths=[300],
        depths=[0, 100],
        n_distractors=2,
        distractor_pool=NEEDLES,
    )
    for trial in grid:
        chosen = {p.needle.needle_id for p in trial.distractors}
        assert len(chosen) == 2 and NEEDLES[0].needle_id not in chosen
        assert chosen <= {n.needle_id for n in NEEDLES[1:]}
        text = word_tok.decode(list(trial.input_ids))
        assert all(p.needle.answer in text for p in trial.distractors)


def test_make_grid_with_needle_sets(sp_tok):
    sets = key_value_needles(2, seed=3, kind="multikey", n_distractors=2)
    grid = make_grid(sp_tok, Haystack.filler(), sets, lengths=[500], depths=[20, 80])
    assert len(grid) == 4
    for trial in grid:
        check_trial(sp_tok, trial, 500)
        assert len(trial.distractors) == 2


# --- the embedded model's world ------------------------------------------------------------------


def test_tiny_adapters():
    world = pytest.importorskip(
        "retrieval_heads.tiny.world", reason="retrieval_heads/tiny/world.py not written yet"
    )
    tok = world.build_tokenizer()
    hay = tiny_haystack(seed=3)
    assert tiny_haystack(seed=3) is hay
    sentences = [s for _, s in zip(range(5), hay.sentences(), strict=False)]
    assert all(s.endswith(" .") for s in sentences)
    needles = tiny_needles(4, seed=1)
    assert len({n.needle_id for n in needles}) == 4 and tiny_needles(4, seed=1) == needles
    sets = tiny_needle_sets(2, seed=1, n_distractors=3)
    assert all(len(s.distractors) == 3 for s in sets)
    assert [s.targets[0] for s in sets] == tiny_needles(2, seed=1)
    template = tiny_template()
    grid = make_grid(tok, hay, sets, lengths=[200, 400], depths=[0, 50, 100], template=template)
    for trial in grid:
        check_trial(tok, trial, trial.context_length)
        assert trial.boundary == "sentence"
        assert trial.input_ids[0] == tok.bos_token_id
        text = decode(tok, trial.input_ids)
        assert text.endswith(f". {trial.question}")  # the training format: context, question


# --- serialisation -------------------------------------------------------------------------------


def test_trial_round_trip(bpe_tok):
    trial = build_trial(
        bpe_tok, Haystack.filler(), MAGIC, length=300, depth_percent=33, distractors=NEEDLES[:1]
    )
    data = json.loads(json.dumps(trial.to_dict()))
    assert Trial.from_dict(data) == trial
    assert "tokenizer" in trial.params and "n_ctx" not in trial.params
    with_n_ctx = build_trial(
        bpe_tok,
        Haystack.filler(),
        MAGIC,
        length=300,
        depth_percent=33,
        distractors=NEEDLES[:1],
        n_ctx=4096,
    )
    assert with_n_ctx.trial_id == trial.trial_id  # n_ctx only bounds the length
    assert hash(trial) == hash(Trial.from_dict(data))
    assert {trial: 1}[Trial.from_dict(data)] == 1


# --- bad input -----------------------------------------------------------------------------------


def test_bad_input_errors_name_the_trial(word_tok):
    hay = Haystack.filler()

    def expect(match: str, **kwargs):
        args = {"length": 300, "depth_percent": 50.0, **kwargs}
        needle = args.pop("needle", MAGIC)
        with pytest.raises(TrialError, match=match) as info:
            build_trial(word_tok, args.pop("haystack", hay), needle, **args)
        message = str(info.value)
        assert f"length={args['length']}" in message and "seed=" in message
        return message

    long_needle = Needle("long", "The special magic number is seven . " * 40, "Number?", "seven")
    message = expect("must be at least", needle=long_needle, length=100)
    assert "long" in message
    expect("must be at least", question="What is it ? " * 100)
    expect("n_ctx=256", n_ctx=256)
    expect("depth_percent must be within", depth_percent=-1)
    expect("depth_percent must be within", depth_percent=100.5)
    expect("depth_percent must be within", depth_percent=float("nan"))
    expect("positive integer", length=0)
    expect("empty", haystack=Haystack.from_strings([]))
    expect("empty", haystack=Haystack.from_strings(["   ", "\n"]))
    expect("empty", haystack=Haystack.from_generator(lambda: iter(())))


def test_empty_haystack_files(tmp_path, word_tok):
    with pytest.raises(TrialError, match="no .txt files"):
        Haystack.from_path(tmp_path)
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(TrialError, match="empty"):
        build_trial(word_tok, Haystack.from_path(tmp_path), MAGIC, length=100, depth_percent=0)
    with pytest.raises(FileNotFoundError):
        Haystack.from_path(tmp_path / "missing")


def test_answer_must_be_in_needle():
    with pytest.raises(TrialError, match="not a substring"):
        Needle("x", "The cat sat on the mat.", "Where?", "on the rug")
    with pytest.raises(TrialError, match="non-empty"):
        Needle("x", "The cat sat.", "Where?", "")


def test_answer_tokens_differ_in_context(word_tok):
    # "garden" is a word of its own, but inside the needle only "gardener" is.
    needle = Needle("partial", "The gardener is here .", "Who is here?", "garden")
    with pytest.raises(TrialError, match="tokenizes differently") as info:
        build_trial(word_tok, Haystack.filler(), needle, length=200, depth_percent=10)
    message = str(info.value)
    assert "answer alone" in message and "needle in context" in message
    assert "'gardener'" in message and "['garden']" in message and "length=200" in message


def test_answer_lost_by_the_tokenizer(word_tok):
    needle = Needle("oov", "The code is zqxwv .", "What is the code?", "zqxwv")
    with pytest.raises(TrialError, match="answer 'zqxwv'.*does not survive tokenization"):
        build_trial(word_tok, Haystack.filler(), needle, length=200, depth_percent=10)
    needle = Needle("oov-needle", "The zqxwv code is seven .", "What is the code?", "seven")
    with pytest.raises(TrialError, match="needle 'oov-needle' does not survive tokenization"):
        build_trial(word_tok, Haystack.filler(), needle, length=200, depth_percent=10)


# --- needle files --------------------------------------------------------------------------------


def test_load_needles(tmp_path):
    assert [n.needle_id for n in NEEDLES][:2] == ["shed-key", "harbour-boat"]
    good = {"id": "a", "needle": "The code is 42.", "question": "Code?", "answer": "42"}
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "id": "b", "extra": 1}) + "\n")
    assert [n.needle_id for n in load_needles(path)] == ["a", "b"]
    assert load_needles(path)[0].to_dict() == good

    def bad(lines: list[str], match: str) -> None:
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(TrialError, match=match):
            load_needles(path)

    ok = json.dumps(good)
    bad([ok, "{not json"], r"n\.jsonl:2: not valid JSON")
    bad([ok, ok.replace('"a"', '"c"'), "[1, 2]"], r":3: expected a JSON object")
    bad([json.dumps({"id": "a", "needle": "x"})], r":1: needle is missing field")
    bad([ok, ok], r":2: needle id 'a' already used on line 1")
    bad([json.dumps({**good, "answer": "43"})], r":1: .*not a substring")
    bad([json.dumps({**good, "answer": 42})], r":1: field 'answer' must be a string")


def test_needle_set_validation():
    with pytest.raises(TrialError, match="at least one target"):
        NeedleSet(())
    with pytest.raises(TrialError, match="repeat"):
        NeedleSet((MAGIC,), (MAGIC,))
