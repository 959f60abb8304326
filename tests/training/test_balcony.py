"""soft-train --method balcony: the teacher cache, the top-k KL against a naive reference,
the checkpoint through models.load (full depth = the base, exits = a hand-built forward),
--resume, and bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from models.checkpoint import EXIT_LAYERS, read_tensors
from models.training.balcony import (
    ExitLayers,
    HeadKL,
    TeacherCache,
    build_cache,
    read_batch,
    topk_kl,
)
from models.training.data import collate, load_dataset
from models.training.evaluate import response_ce
from tests.training.test_data import make_tokenizer
from tests.training.test_train import run_train


def naive_exit_logits(hf: torch.nn.Module, exit_layer: torch.nn.Module, ids: torch.Tensor,
                      e: int) -> torch.Tensor:  # fmt: skip
    """Sub-model e by hand: the base's layers [0, e), then the exit layer, then the
    base's final norm and head, as one transformers model."""
    sub = copy.deepcopy(hf)
    sub.model.layers = torch.nn.ModuleList([*sub.model.layers[:e], copy.deepcopy(exit_layer)])
    sub.model.layers[-1].self_attn.layer_idx = e
    sub.config.num_hidden_layers = e + 1
    return sub(input_ids=ids).logits


def test_topk_kl_is_the_kl_of_the_coarsened_distributions() -> None:
    torch.manual_seed(0)
    n, v, k = 5, 40, 6
    teacher = F.log_softmax(torch.randn(n, v) * 3, dim=-1)
    student = torch.randn(n, v) * 2
    top_v, top_i = teacher.topk(k, dim=-1)
    rest = torch.log1p(-top_v.exp().sum(-1))
    got = topk_kl(student, top_i, top_v, rest)
    # naive: the k top tokens and one "other" outcome, both distributions coarsened alike
    q = F.softmax(student, dim=-1)
    for r in range(n):
        p_c = torch.cat([top_v[r].exp(), rest[r].exp()[None]])
        q_top = q[r, top_i[r]]
        q_c = torch.cat([q_top, (1 - q_top.sum())[None]])
        want = (p_c * (p_c.log() - q_c.log())).sum()
        assert got[r].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    # with k = V it is the full KL
    full_v, full_i = teacher.topk(v, dim=-1)
    exact = F.kl_div(F.log_softmax(student, -1), teacher, log_target=True, reduction="none").sum(-1)
    got_full = topk_kl(student, full_i, full_v, torch.full((n,), -60.0))
    assert torch.allclose(got_full, exact, atol=1e-4)


def test_head_kl_gradient_matches_autograd() -> None:
    torch.manual_seed(1)
    n, h, v, k = 6, 8, 30, 4
    x = torch.randn(n, h, requires_grad=True)
    w = torch.randn(v, h)
    teacher = F.log_softmax(torch.randn(n, v) * 2, dim=-1)
    top_v, top_i = teacher.topk(k, dim=-1)
    rest = torch.log1p(-top_v.exp().sum(-1))
    got = HeadKL.apply(x, w, top_i, top_v, rest)
    (g_got,) = torch.autograd.grad(got, x)
    x2 = x.detach().clone().requires_grad_(True)
    want = topk_kl(F.linear(x2, w), top_i, top_v, rest).sum()
    (g_want,) = torch.autograd.grad(want, x2)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(g_got, g_want, atol=1e-5)


def test_cache_round_trips_and_is_reused(tiny_base: Path, data_file: Path, tmp_path: Path
                                         ) -> None:  # fmt: skip
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    data = load_dataset(data_file, make_tokenizer(), 64)
    cache = build_cache(hf, data.examples, [1, 3], 5, tmp_path / "tc", progress=False)
    assert cache.num_sequences == len(data.examples)
    s = 3
    ids = torch.tensor([data.examples[s].input_ids])
    with torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True)
    sl = cache.sequence(s)
    assert cache.tokens[sl].tolist() == list(data.examples[s].input_ids)
    for e in (1, 3):
        got = torch.from_numpy(np.asarray(cache.hidden[e][sl])).float()
        assert torch.allclose(got, out.hidden_states[e][0], atol=2e-3, rtol=1e-3)
    logp = F.log_softmax(out.logits[0], dim=-1)
    top_v, top_i = logp.topk(5, dim=-1)
    assert torch.equal(torch.from_numpy(np.asarray(cache.top_ids[sl])).long(), top_i)
    assert torch.allclose(torch.from_numpy(np.asarray(cache.top_logp[sl])).float(), top_v,
                          atol=1e-2)  # fmt: skip
    rest = torch.from_numpy(np.asarray(cache.rest_logp[sl]))
    assert torch.allclose(rest.exp() + top_v.exp().sum(-1), torch.ones(len(rest)), atol=1e-4)
    # the same base, data, exits and k: the same directory, opened, not rebuilt
    mtime = (cache.directory / "meta.json").stat().st_mtime_ns
    again = build_cache(hf, data.examples, [1, 3], 5, tmp_path / "tc", progress=False)
    assert again.directory == cache.directory
    assert (cache.directory / "meta.json").stat().st_mtime_ns == mtime
    # another k is another cache
    other = build_cache(hf, data.examples, [1, 3], 4, tmp_path / "tc", progress=False)
    assert other.directory != cache.directory
    # an interrupted build is not mistaken for a cache
    meta = json.loads((other.directory / "meta.json").read_text())
    (other.directory / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(ValueError, match="not a complete"):
        TeacherCache.open(other.directory)


def test_exit_layers_loss_is_the_naive_per_exit_kl(tiny_base: Path, data_file: Path,
                                                   tmp_path: Path) -> None:  # fmt: skip
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    hf.requires_grad_(False)
    data = load_dataset(data_file, make_tokenizer(), 64)
    k = hf.config.vocab_size  # every token kept: the loss is the exact KL
    cache = build_cache(hf, data.examples, [1, 2], k, tmp_path / "tc", progress=False)
    layers = ExitLayers(hf, [1, 2], "next")
    seqs = [0, 4, 7]
    n_tok = sum(len(data.examples[s].input_ids) for s in seqs)
    loss, per_exit = layers(read_batch(cache, seqs, float(n_tok)))
    with torch.no_grad():
        want_total = 0.0
        for e in (1, 2):
            kl_sum = 0.0
            for s in seqs:
                ids = torch.tensor([data.examples[s].input_ids])
                teacher = F.log_softmax(hf(input_ids=ids).logits[0], -1)
                student = F.log_softmax(naive_exit_logits(hf, layers.layers[str(e)], ids, e)[0], -1)
                kl_sum += F.kl_div(student, teacher, log_target=True, reduction="sum").item()
            assert per_exit[e] == pytest.approx(kl_sum, rel=2e-3)
            want_total += kl_sum / n_tok
    assert loss.item() == pytest.approx(want_total, rel=2e-3)


def test_balcony_checkpoint_full_depth_is_the_base_and_exits_match_by_hand(
    tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "balcony"
    run_train("--model", tiny_base, "--data", data_file, "--out", out, "--method", "balcony",
              "--exits", "1,2", "--steps", "3", "--batch-size", "2", "--teacher-k", "8",
              "--lr", "1e-3", "--cache-dir", tmp_path / "tc", "--max-length", "64")  # fmt: skip
    soft = json.loads((out / "soft.json").read_text())
    assert soft["method"] == "balcony" and soft["exits"] == [1, 2, 4]
    assert soft["training"]["steps"] == 3 and set(soft["training"]["final_kl"]) == {"1", "2"}
    assert not (out / "config.json").exists()  # a small checkpoint over its base
    tensors = read_tensors(out / EXIT_LAYERS)
    assert {k.split(".")[1] for k in tensors} == {"1", "2"}
    m = models.load(out)
    base = models.load(tiny_base)
    assert m.method == "balcony" and m.exits == (1, 2, 4)
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    assert torch.equal(m.logits(ids, 4), base.logits(ids, 4))  # bit for bit
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    for e in (1, 2):
        layer = copy.deepcopy(hf.model.layers[e])
        prefix = f"exits.{e}."
        sd = {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        layer.load_state_dict(sd)
        with torch.no_grad():
            want = naive_exit_logits(hf, layer, ids, e)
        got = m.logits(ids, e)
        assert (got - want).abs().max().item() < 1e-4, e
        assert not torch.allclose(got, base.logits(ids, e))  # the exit layer is used
    # one batch, rows at several exits (deepest first), equals each depth alone
    depths = [4, 2, 2, 1]
    ids4 = torch.randint(3, 200, (4, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        pos = torch.arange(7).expand(4, 7)
        mixed = m.head(m.hidden(ids4, pos, depths), depths)
    for j, d in enumerate(depths):
        assert torch.allclose(mixed[j], m.logits(ids4[j : j + 1], d)[0], atol=1e-5), (j, d)
    assert m.weight_bytes(2) == base.weight_bytes(3)  # 2 base layers + the exit layer
    # soft-eval's CE carries the base's residual deeper and runs each exit layer on a copy
    ds = load_dataset(data_file, m.tokenizer, 64)
    ce = response_ce(m, ds, [1, 2, 4], batch_size=3)
    for d in (1, 2, 4):
        total, n = 0.0, 0
        for ex in ds.examples:
            b = collate([ex], 0)
            tgt = b.labels[0, 1:]
            logits = m.logits(b.input_ids, d)[0, :-1]
            total += float(F.cross_entropy(logits, tgt, ignore_index=-100, reduction="sum"))
            n += int((tgt != -100).sum())
        assert math.isclose(ce[d], total / n, rel_tol=1e-5), d


def test_balcony_resume_continues(tiny_base: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    common = ("--model", tiny_base, "--data", data_file, "--out", out, "--method", "balcony",
              "--exits", "2", "--batch-size", "2", "--teacher-k", "8", "--save-every", "1",
              "--cache-dir", tmp_path / "tc", "--max-length", "64", "--resume")  # fmt: skip
    run_train(*common, "--steps", "2")
    run_train(*common, "--steps", "4")
    training = json.loads((out / "soft.json").read_text())["training"]
    assert training["steps"] == 4 and len(training["commands"]) == 2
    assert math.isfinite(training["final_kl"]["2"])


@pytest.mark.parametrize(
    "bad",
    [["--lora-rank", "4"], ["--exits", "4"], ["--distill", "0.5"]],
)
def test_balcony_bad_cli_input_exits_2(bad: list[str], tiny_base: Path, data_file: Path,
                                       tmp_path: Path, capsys) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as e:
        run_train("--model", tiny_base, "--data", data_file, "--out", tmp_path / "o",
                  "--method", "balcony", "--steps", "1", "--cache-dir", tmp_path / "tc",
                  *bad)  # fmt: skip
    assert e.value.code == 2
    assert "balcony" in capsys.readouterr().err
