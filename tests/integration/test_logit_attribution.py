"""Write scores (per-head direct logit attribution to the generated answer) against references.

- a brute force on a *fresh* Hugging Face copy of each model (no bridge: plain torch hooks on
  ``o_proj``'s input, the norms' inputs and ``lm_head``), each head's write projected onto the
  whole vocabulary the long way: Llama, Qwen2 (GQA, q/k/v biases), GPT-2 (LayerNorm, output
  bias) and a Gemma 3 (GQA, sliding and global layers, post-attention norms, ``1 + weight``
  gains, final logit soft-capping), plus a one-token prompt;
- completeness: per layer, the heads' scores plus the output bias equal what the attention
  block's real output writes through the same frozen norm; with the MLPs and the embedding,
  every term sums to the real pre-cap logit of the generated token (and, centred, to that logit
  minus the mean logit), and the cap applied to it gives the model's own logit;
- an exact case: removing one last-layer head (its ``hook_z`` zeroed) with the final norm's
  scale, the post-attention norm's scale and the last MLP's output held at their clean values
  changes the logit by exactly that head's score;
- the shipped ``tiny`` model (golden): its top write heads are its retrieval heads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from retrieval_heads.logit_attribution import write_attributions, write_scores
from retrieval_heads.scoring import DecodeConfig, score_trial
from retrieval_heads.trials.builder import build_trial
from retrieval_heads.trials.haystacks import Haystack
from retrieval_heads.trials.needles import Needle
from retrieval_heads.trials.template import PromptTemplate

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

ATOL = 1e-4
SOFTCAP = 3.0  # small enough that the cap bends the tiny Gemma's logits
CASES = {
    "llama": ("llama_model", "tiny_llama_dir"),
    "gqa": ("gqa_model", "tiny_gqa_dir"),
    "gpt2": ("gpt2_model", "tiny_gpt2_dir"),
    "gemma3": ("gemma3_capped_model", "gemma3_capped_dir"),
}


def word_trial(tokenizer, length=96, depth=40):
    """A NIAH trial over the plain words (as ``test_lean_decode.gqa_trial``)."""
    words = [f"w{i}" for i in range(100)]
    haystack = Haystack.from_strings([" ".join(words[i : i + 9]) for i in range(0, 90, 9)])
    needle = Needle("n", "w1 w2 w3 w97 w98 w99", "w4 w5 w6", "w97 w98 w99")
    return build_trial(
        tokenizer,
        haystack,
        needle,
        length=length,
        depth_percent=depth,
        template=PromptTemplate(text="{context} {question}"),
    )


@pytest.fixture(scope="module")
def gemma3_capped_dir(tmp_path_factory, word_tokenizer):
    """Gemma 3: sliding (window 8) and global layers, 4 query heads on 2 KV heads, final logit
    soft-capping at ``SOFTCAP``, every norm's weight drawn away from 0 (gain ``1 + weight``)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(word_tokenizer.get_vocab()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=512,
        final_logit_softcapping=SOFTCAP,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(11)
    model = Gemma3ForCausalLM(config)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(0.3 * noise if "norm" in name else 0.15 * noise)
    path = tmp_path_factory.mktemp("gemma3-capped")
    model.save_pretrained(path)
    word_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma3_capped_model(gemma3_capped_dir):
    from retrieval_heads import load_model

    return load_model(gemma3_capped_dir, device="cpu")


# ---- the reference: a fresh HF model, plain torch hooks -----------------------------------


@dataclass
class Reference:
    """One full forward of the HF model over ``ids`` (positions ``[pos]``, float32)."""

    z: torch.Tensor  # [layer, pos, head, d_head]: o_proj's input
    w_o: torch.Tensor  # [layer, head, d_head, d_model]
    b_o: torch.Tensor  # [layer, d_model] (zeros without an output bias)
    post_in: torch.Tensor | None  # [layer, pos, d_model]: the post-attention norm's input
    post_gain: torch.Tensor | None  # [layer, d_model]
    post_eps: float
    attn_out: torch.Tensor  # [layer, pos, d_model]: what attention adds to the residual
    mlp_out: torch.Tensor  # [layer, pos, d_model]
    embed: torch.Tensor  # [pos, d_model]: the first layer's input
    resid: torch.Tensor  # [pos, d_model]: the final norm's input
    gain: torch.Tensor  # [d_model]
    bias: torch.Tensor  # [d_model]
    eps: float
    centre: bool
    w_u: torch.Tensor  # [d_model, vocab]
    b_u: torch.Tensor  # [vocab]
    pre_logits: torch.Tensor  # [pos, vocab]: lm_head's output
    logits: torch.Tensor  # [pos, vocab]: the model's output (after any soft cap)

    def sigma(self, pos: int) -> torch.Tensor:
        x = self.resid[pos]
        if self.centre:
            x = x - x.mean()
        return (x.pow(2).mean() + self.eps).sqrt()

    def through_final(self, write: torch.Tensor, pos: int) -> torch.Tensor:
        """The logits ``[..., vocab]`` a write to the residual at ``pos`` makes through the
        final norm frozen at its real scale there (no norm bias, no unembedding bias)."""
        if self.centre:
            write = write - write.mean(-1, keepdim=True)
        return (write / self.sigma(pos) * self.gain) @ self.w_u

    def through_post(self, write: torch.Tensor, layer: int, pos: int) -> torch.Tensor:
        if self.post_in is None:
            return write
        assert self.post_gain is not None
        sigma = (self.post_in[layer, pos].pow(2).mean() + self.post_eps).sqrt()
        return write / sigma * self.post_gain[layer]


def reference(directory, ids: list[int]) -> Reference:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    cfg = hf.config
    n_heads = cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head
    gpt2 = hasattr(hf, "transformer")
    gemma = "Gemma" in type(hf).__name__
    layers = hf.transformer.h if gpt2 else hf.model.layers
    final = hf.transformer.ln_f if gpt2 else hf.model.norm
    seen: dict[str, list] = {k: [] for k in ("z", "post_in", "attn", "mlp", "embed", "resid")}

    def first_input(key):
        def hook(module, args, kwargs):
            seen[key].append((args[0] if args else kwargs["hidden_states"])[0].detach())

        return hook

    def output(key):
        def hook(module, args, out):
            seen[key].append((out[0] if isinstance(out, tuple) else out)[0].detach())

        return hook

    w_o, b_o, post_gain = [], [], []
    for layer in layers:
        if gpt2:
            o_proj, attn, mlp = layer.attn.c_proj, layer.attn, layer.mlp
            weight = o_proj.weight  # Conv1D: [in, out]
        else:
            o_proj = layer.self_attn.o_proj
            attn = layer.post_attention_layernorm if gemma else layer.self_attn
            mlp = layer.post_feedforward_layernorm if gemma else layer.mlp
            weight = o_proj.weight.T
            if gemma:
                layer.post_attention_layernorm.register_forward_pre_hook(
                    first_input("post_in"), with_kwargs=True
                )
                post_gain.append(1 + layer.post_attention_layernorm.weight.detach())
        w_o.append(weight.detach().reshape(n_heads, -1, weight.shape[-1]))
        bias = o_proj.bias
        b_o.append(torch.zeros(weight.shape[-1]) if bias is None else bias.detach())
        o_proj.register_forward_pre_hook(first_input("z"), with_kwargs=True)
        attn.register_forward_hook(output("attn"))
        mlp.register_forward_hook(output("mlp"))
    layers[0].register_forward_pre_hook(first_input("embed"), with_kwargs=True)
    final.register_forward_pre_hook(first_input("resid"), with_kwargs=True)
    pre: list[torch.Tensor] = []
    hf.lm_head.register_forward_hook(lambda m, a, out: pre.append(out[0].detach()))
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]

    d_head = w_o[0].shape[1]
    z = torch.stack([x.reshape(x.shape[0], n_heads, d_head) for x in seen["z"]])
    eps = final.eps if hasattr(final, "eps") else final.variance_epsilon
    weight = final.weight.detach()
    bias = getattr(final, "bias", None)
    lm_bias = hf.lm_head.bias
    return Reference(
        z=z,
        w_o=torch.stack(w_o),
        b_o=torch.stack(b_o),
        post_in=torch.stack(seen["post_in"]) if gemma else None,
        post_gain=torch.stack(post_gain) if gemma else None,
        post_eps=float(layers[0].post_attention_layernorm.eps) if gemma else 0.0,
        attn_out=torch.stack(seen["attn"]),
        mlp_out=torch.stack(seen["mlp"]),
        embed=seen["embed"][0],
        resid=seen["resid"][0],
        gain=1 + weight if gemma else weight,
        bias=torch.zeros_like(weight) if bias is None else bias.detach(),
        eps=float(eps),
        centre=gpt2,
        w_u=hf.lm_head.weight.detach().T,
        b_u=torch.zeros(logits.shape[-1]) if lm_bias is None else lm_bias.detach(),
        pre_logits=pre[0],
        logits=logits,
    )


def brute_force(ref: Reference, first: int, answer: list[int], center: bool) -> np.ndarray:
    """``a[s, l, h]`` the long way: each head's write through the frozen norms onto the whole
    vocabulary, then the generated token's logit (minus the mean logit with ``center``)."""
    n_layers, n_heads = ref.w_o.shape[:2]
    out = np.zeros((len(answer), n_layers, n_heads))
    for s, token in enumerate(answer):
        pos = first + s
        for layer in range(n_layers):
            for head in range(n_heads):
                write = ref.z[layer, pos, head] @ ref.w_o[layer, head]
                logits = ref.through_final(ref.through_post(write, layer, pos), pos)
                out[s, layer, head] = logits[token] - (logits.mean() if center else 0)
    return out


def answered(model, trial, steps=4):
    config = DecodeConfig(max_new_tokens=steps, stop_at_eos=False, stop_strings=())
    record = score_trial(model, trial, config)
    assert len(record.generated_ids) == steps
    return record


def case(name, request, word_tokenizer):
    model_fixture, dir_fixture = CASES[name]
    model = request.getfixturevalue(model_fixture)
    trial = word_trial(word_tokenizer)
    record = answered(model, trial)
    prompt, answer = list(trial.input_ids), list(record.generated_ids)
    ref = reference(request.getfixturevalue(dir_fixture), prompt + answer[:-1])
    return model, trial, record, ref, len(prompt) - 1, answer


# ---- against the brute force --------------------------------------------------------------


@pytest.mark.parametrize("center", [False, True], ids=["raw", "centred"])
@pytest.mark.parametrize("name", list(CASES))
def test_write_attributions_equal_the_brute_force(name, center, request, word_tokenizer):
    model, trial, record, ref, first, answer = case(name, request, word_tokenizer)
    got = write_attributions(model, trial, record, center=center)
    want = brute_force(ref, first, answer, center)
    assert got.shape == (len(answer), model.n_layers, model.n_heads)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-4)
    assert np.abs(want).max() > 100 * ATOL  # not a comparison of zeros
    np.testing.assert_allclose(
        write_scores(model, trial, record, center=center), want.mean(axis=0), atol=ATOL
    )
    if name == "gemma3":  # the windows matter: queries lie past the sliding window of 8
        assert model.layer_windows() == [8, None, 8] and first > 8


def test_a_one_token_prompt_and_plain_id_lists(llama_model, tiny_llama_dir):
    prompt, answer = [12], [40, 41, 42]
    ref = reference(tiny_llama_dir, prompt + answer[:-1])
    got = write_attributions(llama_model, prompt, answer, center=False)
    np.testing.assert_allclose(got, brute_force(ref, 0, answer, False), atol=ATOL, rtol=1e-4)


# ---- completeness -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_heads_and_the_other_terms_sum_to_the_real_logit(name, request, word_tokenizer):
    model, trial, record, ref, first, answer = case(name, request, word_tokenizer)
    raw = write_attributions(model, trial, record, center=False)
    centred = write_attributions(model, trial, record, center=True)
    for s, token in enumerate(answer):
        pos = first + s
        # The decomposition the terms come from: embedding + every sublayer's write.
        resid = ref.embed[pos] + ref.attn_out[:, pos].sum(0) + ref.mlp_out[:, pos].sum(0)
        torch.testing.assert_close(resid, ref.resid[pos], atol=1e-4, rtol=1e-4)
        terms = ref.through_final(ref.embed[pos], pos) + ref.bias @ ref.w_u + ref.b_u
        for layer in range(model.n_layers):
            bias = ref.through_final(ref.through_post(ref.b_o[layer], layer, pos), pos)
            block = ref.through_final(ref.attn_out[layer, pos], pos)
            # The heads of a layer and its output bias make the attention block's write.
            assert raw[s, layer].sum() + bias[token].item() == pytest.approx(
                block[token].item(), abs=ATOL
            )
            centred_block = block[token] - block.mean() - (bias[token] - bias.mean())
            assert centred[s, layer].sum() == pytest.approx(centred_block.item(), abs=ATOL)
            terms = terms + bias + ref.through_final(ref.mlp_out[layer, pos], pos)
        # Everything through the frozen final norm: the real (pre-cap) logits.
        pre = ref.pre_logits[pos]
        total = raw[s].sum() + terms[token].item()
        assert total == pytest.approx(pre[token].item(), abs=1e-3)
        centred_total = centred[s].sum() + (terms[token] - terms.mean()).item()
        assert centred_total == pytest.approx((pre[token] - pre.mean()).item(), abs=1e-3)
        if name == "gemma3":  # the scores live before the cap; the cap gives the real logit
            capped = SOFTCAP * torch.tanh(pre / SOFTCAP)
            torch.testing.assert_close(capped, ref.logits[pos], atol=1e-5, rtol=1e-5)
            assert (pre - ref.logits[pos]).abs().max() > 0.1  # the cap does bend them
        else:
            torch.testing.assert_close(pre, ref.logits[pos])


# ---- the exact case: one head removed, every scale frozen ---------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3"])
def test_removing_a_last_layer_head_changes_the_logit_by_its_score(name, request, word_tokenizer):
    model = request.getfixturevalue(CASES[name][0])
    bridge = model.bridge
    trial = word_trial(word_tokenizer)
    record = answered(model, trial)
    answer = list(record.generated_ids)
    ids = torch.tensor([list(trial.input_ids) + answer[:-1]])
    positions = torch.arange(len(trial.input_ids) - 1, ids.shape[1])
    last = model.n_layers - 1
    frozen = ["ln_final.hook_scale", f"blocks.{last}.hook_mlp_out"]
    if hasattr(bridge.blocks[last], "ln1_post"):
        frozen.append(f"blocks.{last}.ln1_post.hook_scale")
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, names_filter=[*frozen, "unembed.hook_out"])
    clean = cache["unembed.hook_out"][0, positions]  # pre-cap logits
    tokens = torch.tensor(answer)
    raw = write_attributions(model, trial, record, center=False)
    centred = write_attributions(model, trial, record, center=True)
    for head in range(model.n_heads):

        def zero(z, hook, head=head):
            z = z.clone()
            z[:, :, head] = 0
            return z

        hooks = [(key, lambda act, hook, key=key: cache[key].clone()) for key in frozen]
        hooks.append((model.hook_name(last, "z"), zero))
        kept: list[torch.Tensor] = []

        def keep(act, hook, kept=kept):
            kept.append(act[0, positions])

        hooks.append(("unembed.hook_out", keep))
        with torch.no_grad():
            bridge.run_with_hooks(ids, fwd_hooks=hooks)
        change = clean - kept[0]  # [step, vocab]: what the head alone wrote
        got = change[torch.arange(len(answer)), tokens]
        np.testing.assert_allclose(raw[:, last, head], got.numpy(), atol=ATOL)
        got_centred = got - change.mean(-1)
        np.testing.assert_allclose(centred[:, last, head], got_centred.numpy(), atol=ATOL)
        assert got.abs().max() > 100 * ATOL


# ---- interface ----------------------------------------------------------------------------


def test_empty_answers_bad_ids_and_attached_hooks(llama_model, word_tokenizer):
    trial = word_trial(word_tokenizer)
    assert write_attributions(llama_model, trial, []).shape == (0, 2, 4)
    assert np.isnan(write_scores(llama_model, trial, [])).all()
    with pytest.raises(ValueError, match="generated ids"):
        write_scores(llama_model, trial, [10_000])
    answer = list(answered(llama_model, trial, steps=3).generated_ids)
    plain = write_scores(llama_model, trial.input_ids, answer)
    np.testing.assert_array_equal(plain, write_scores(llama_model, trial, answer))

    def zero_head_2(z, hook):
        z[:, :, 2] = 0
        return z

    with llama_model.hooks([(llama_model.hook_name(1, "z"), zero_head_2)]):
        ablated = write_scores(llama_model, trial, answer)
    assert ablated[1, 2] == 0 and plain[1, 2] != 0  # scored on the run the hooks changed


# ---- the shipped tiny model ----------------------------------------------------------------


@pytest.mark.golden
def test_tiny_top_write_heads_are_its_retrieval_heads(tiny_model, tiny_trials):
    """Measured on the shipped weights: mean write scores over the 12 trials rank 2.6 (0.70),
    2.7, 2.5, 2.1, 2.0, 2.4 (0.35) first, then 1.5 (0.26); layer 0 writes ~0. The same six
    heads are the retrieval score's top six (tiny's retrieval heads)."""
    tables, retrieval, elapsed = [], [], []
    for trial in tiny_trials:
        record = score_trial(tiny_model, trial)
        start = time.perf_counter()
        tables.append(write_scores(tiny_model, trial, record))
        elapsed.append(time.perf_counter() - start)
        retrieval.append(np.asarray(record.scores["retrieval"]))
    table = np.mean(tables, axis=0)
    assert table.shape == (8, 8) and np.isfinite(table).all()

    def top(scores, k=6):
        order = np.argsort(-scores.ravel(), kind="stable")[:k]
        return {f"{i // 8}.{i % 8}" for i in order}

    assert top(table) == {"2.0", "2.1", "2.4", "2.5", "2.6", "2.7"}
    assert top(table) == top(np.mean(retrieval, axis=0))
    assert top(table, 1) == {"2.6"}
    assert np.abs(table[0]).max() < 0.01
    assert max(elapsed) < 5  # ~0.04-0.1 s per trial measured (CPU, one thread)
