"""soft-train --method balcony: the sharded teacher cache, the sampled KL against the full
KL (exact with every column, close on average with a sample), the checkpoint through
models.load (full depth = the base, exits = a hand-built forward), --resume, continuing
from committed exit weights with the CE-vs-CPU-hours curve, and bad input."""

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
    TeacherCache,
    build_cache,
    head_columns,
    read_batch,
    sampled_kl,
)
from models.training.data import collate, load_dataset
from models.training.evaluate import response_ce
from tests.training.test_data import make_tokenizer, write_alpaca
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


def full_kl(x: torch.Tensor, w: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """The reference: per-token KL(teacher || softmax(x W^T)) over the whole vocabulary."""
    student = F.log_softmax(F.linear(x, w), dim=-1)
    return F.kl_div(student, teacher_logp, log_target=True, reduction="none").sum(-1)


def test_sampled_kl_with_every_column_is_the_full_kl_and_its_gradient() -> None:
    torch.manual_seed(0)
    n, h, v = 6, 8, 40
    x = torch.randn(n, h, requires_grad=True)
    w = torch.randn(v, h)
    teacher = F.log_softmax(torch.randn(n, v) * 3, dim=-1)
    got = sampled_kl(x, w, teacher, None)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    want = full_kl(x2, w, teacher)
    (g_want,) = torch.autograd.grad(want.sum(), x2)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(g_got, g_want, atol=1e-5)
    # every tail token drawn: the weights are 1 and the estimate is exact again
    top = teacher.topk(3, dim=-1).indices
    cols = head_columns(v, torch.tensor([0, 1]), top, samples=v)
    assert cols.ids is not None and sorted(cols.ids.tolist()) == list(range(v))
    assert cols.log_weight is not None and torch.equal(cols.log_weight, torch.zeros(v))
    got_all = sampled_kl(x, w[cols.ids], teacher[:, cols.ids], cols.log_weight)
    assert torch.allclose(got_all, want, atol=1e-5)


def test_head_columns_hold_the_exact_set_and_every_top_token_once() -> None:
    v = 50
    top = torch.tensor([[3, 4, 40], [4, 9, 41]])
    cols = head_columns(v, torch.tensor([0, 1, 3]), top, samples=10,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert cols.ids is not None and cols.log_weight is not None
    exact = cols.ids[: cols.exact].tolist()
    assert sorted(exact) == [0, 1, 3, 4, 9, 40, 41]
    drawn = cols.ids[cols.exact :].tolist()
    assert len(drawn) == 10 and len(set(drawn)) == 10 and not set(drawn) & set(exact)
    # each drawn column stands for (tail size / draws) tokens
    assert cols.log_weight[cols.exact :].allclose(torch.full((10,), math.log((v - 7) / 10)))
    assert cols.log_weight[: cols.exact].eq(0).all()


def test_sampled_kl_is_close_to_the_full_kl_and_its_gradient_on_average() -> None:
    """The tail is estimated from a sample: over many draws the normaliser's estimate is
    unbiased, and the KL and its gradient come close to the full ones (the log of an
    estimate is biased by Jensen's inequality; with the teacher's top tokens exact the
    bias is small)."""
    torch.manual_seed(2)
    n, h, v = 4, 16, 400
    w = torch.randn(v, h) * 0.5
    teacher = F.log_softmax(F.linear(torch.randn(n, h), w) * 1.5, dim=-1)
    x = (torch.randn(n, h) * 0.5).requires_grad_(True)  # a student still far from it
    want = full_kl(x, w, teacher)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    top = teacher.topk(8, dim=-1).indices
    gen = torch.Generator().manual_seed(0)
    draws, kls, grads, zs = 400, [], [], []
    z_full = torch.logsumexp(F.linear(x, w), -1).detach()
    for _ in range(draws):
        c = head_columns(v, torch.arange(16), top, samples=64, generator=gen)
        assert c.ids is not None and c.log_weight is not None
        est = sampled_kl(x, w[c.ids], teacher[:, c.ids], c.log_weight)
        (g,) = torch.autograd.grad(est.sum(), x)
        kls.append(est.detach())
        grads.append(g)
        zs.append(torch.logsumexp(F.linear(x, w[c.ids]) + c.log_weight, -1).exp().detach())
    z_mean = torch.stack(zs).mean(0)
    assert torch.allclose(z_mean, z_full.exp(), rtol=0.03)  # unbiased normaliser
    assert torch.allclose(torch.stack(kls).mean(0), want.detach(), rtol=0.05, atol=0.02)
    g_mean = torch.stack(grads).mean(0)
    assert (g_mean - g_want).norm() < 0.1 * g_want.norm()


def test_cache_round_trips_in_shards_and_is_reused(tiny_base: Path, data_file: Path,
                                                   tmp_path: Path) -> None:  # fmt: skip
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    data = load_dataset(data_file, make_tokenizer(), 64)
    cache = build_cache(hf, data.examples, [1, 3], 5, tmp_path / "tc", progress=False,
                        shard_tokens=100)  # fmt: skip
    assert len(cache.shards) > 2 and cache.num_sequences == len(data.examples)
    assert cache.num_tokens == sum(len(e.input_ids) for e in data.examples)
    for s in (0, 3, len(data.examples) - 1):
        shard, i = cache.locate(s)
        sl = shard.sequence(i)
        ids = torch.tensor([data.examples[s].input_ids])
        with torch.no_grad():
            out = hf.model(input_ids=ids, output_hidden_states=True)
        assert shard.tokens[sl].tolist() == list(data.examples[s].input_ids)
        for e in (1, 3):
            got = torch.from_numpy(np.asarray(shard.hidden[e][sl])).float()
            assert torch.allclose(got, out.hidden_states[e][0], atol=2e-3, rtol=1e-3)
        fin = torch.from_numpy(np.asarray(shard.final[sl])).float()
        assert torch.allclose(fin, out.last_hidden_state[0], atol=2e-3, rtol=1e-3)
        logits = F.linear(fin, hf.lm_head.weight)
        logz = torch.from_numpy(np.asarray(shard.logz[sl]))
        assert torch.allclose(logz, torch.logsumexp(logits, -1), atol=1e-4)
        top = torch.from_numpy(np.asarray(shard.top_ids[sl])).long()
        assert torch.equal(top, logits.topk(5, dim=-1).indices)
    # the same base, data, exits and k: the same shards, opened, not rebuilt
    first = cache.shards[0].directory / "meta.json"
    mtime = first.stat().st_mtime_ns
    again = build_cache(hf, data.examples, [1, 3], 5, tmp_path / "tc", progress=False,
                        shard_tokens=100)  # fmt: skip
    assert [s.directory for s in again.shards] == [s.directory for s in cache.shards]
    assert first.stat().st_mtime_ns == mtime
    # an interrupted shard is not mistaken for a cache, and a build resumes by redoing it
    last = cache.shards[-1].directory / "meta.json"
    meta = json.loads(last.read_text())
    last.write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(ValueError, match="not a complete"):
        TeacherCache.open(last.parent)
    resumed = build_cache(hf, data.examples, [1, 3], 5, tmp_path / "tc", progress=False,
                          shard_tokens=100)  # fmt: skip
    assert first.stat().st_mtime_ns == mtime  # untouched
    assert json.loads(last.read_text())["complete"] is True  # rebuilt
    assert resumed.num_tokens == cache.num_tokens
    # another k is another cache
    other = build_cache(hf, data.examples, [1, 3], 4, tmp_path / "tc", progress=False)
    assert other.shards[0].directory != cache.shards[0].directory


def test_exit_layers_loss_is_the_naive_per_exit_kl(tiny_base: Path, data_file: Path,
                                                   tmp_path: Path) -> None:  # fmt: skip
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    hf.requires_grad_(False)
    data = load_dataset(data_file, make_tokenizer(), 64)
    cache = build_cache(hf, data.examples, [1, 2], 4, tmp_path / "tc", progress=False)
    layers = ExitLayers(hf, [1, 2], "next")
    seqs = [0, 4, 7]
    n_tok = sum(len(data.examples[s].input_ids) for s in seqs)
    batch = read_batch(cache, seqs, float(n_tok))
    loss, per_exit = layers(batch)  # exact=None: the whole vocabulary, the exact KL
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
    # the sampled head with every tail token drawn is the same loss
    loss_s, per_s = layers(batch, torch.arange(5), samples=hf.config.vocab_size)
    assert loss_s.item() == pytest.approx(loss.item(), rel=1e-4)


def test_an_exit_between_cached_depths_runs_the_base_layers_in_between(
    tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    """--cache-exits: exit 3 trained on a cache of depth 1 only (the frozen base layers 1
    and 2 bridge it) sees the same residual and loss as with depth 3 cached."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    hf.requires_grad_(False)
    data = load_dataset(data_file, make_tokenizer(), 64)
    seqs = [0, 4, 7]
    n_tok = float(sum(len(data.examples[s].input_ids) for s in seqs))
    layers = ExitLayers(hf, [1, 3], "last")
    torch.manual_seed(0)
    with torch.no_grad():  # exit 3 a copy of the last layer would match the base exactly
        for p in layers.layers["3"].parameters():
            p.add_(0.2 * torch.randn_like(p))
    both = read_batch(build_cache(hf, data.examples, [1, 3], 4, tmp_path / "a", progress=False),
                      seqs, n_tok)  # fmt: skip
    low = read_batch(build_cache(hf, data.examples, [1], 4, tmp_path / "b", progress=False),
                     seqs, n_tok)  # fmt: skip
    assert set(low.hidden) == {1}
    cos_sin = hf.model.rotary_emb(low.hidden[1], low.positions)
    bridged = layers.residual(low, 3, cos_sin)
    real = both.mask.bool()
    assert torch.allclose(bridged[real], both.hidden[3][real], atol=2e-2, rtol=1e-2)
    loss_both, per_both = layers(both)
    loss_low, per_low = layers(low)
    assert per_low[3] == pytest.approx(per_both[3], rel=1e-2)
    assert per_low[1] == pytest.approx(per_both[1], rel=1e-6)
    loss_low.backward()  # the bridge is frozen: gradients reach the exit layers only
    assert all(p.grad is None for p in hf.parameters())
    assert all(p.grad is not None for p in layers.layers["3"].parameters())


def test_balcony_checkpoint_full_depth_is_the_base_and_exits_match_by_hand(
    tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "balcony"
    run_train("--model", tiny_base, "--data", data_file, "--out", out, "--method", "balcony",
              "--exits", "1,2", "--steps", "3", "--batch-size", "2", "--teacher-k", "8",
              "--lr", "1e-3", "--cache-dir", tmp_path / "tc", "--max-length", "64",
              "--head-exact", "16", "--head-samples", "32")  # fmt: skip
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


def test_balcony_continues_from_committed_exit_weights_and_their_curve(
    tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    """A later session starts from a checkpoint's exit layers (no resume state: only the
    committed weights and soft.json), on other data, and its curve goes on from there."""
    held = write_alpaca(tmp_path / "held.json", 4)
    common = ("--model", tiny_base, "--method", "balcony", "--exits", "1,2",
              "--batch-size", "2", "--cache-dir", tmp_path / "tc", "--max-length", "64",
              "--eval-data", held, "--head-exact", "8", "--head-samples", "16")  # fmt: skip
    first = tmp_path / "first"
    run_train(*common, "--data", f"{data_file}@:6", "--out", first, "--steps", "3",
              "--lr", "1e-3")  # fmt: skip
    t1 = json.loads((first / "soft.json").read_text())["training"]
    curve1 = json.loads((first / "curve.json").read_text())
    assert [p["step"] for p in curve1] == [0, 3] and set(curve1[0]["ce"]) == {"1", "2"}
    assert all(math.isfinite(v) for p in curve1 for v in p["ce"].values())
    assert t1["cpu_hours"] >= curve1[-1]["cpu_hours"] > 0
    assert (first / "curve.png").stat().st_size > 0
    # a new run with a zero learning rate keeps the committed weights exactly
    second = tmp_path / "second"
    run_train(*common, "--data", f"{data_file}@6:", "--out", second, "--steps", "1",
              "--lr", "0", "--init-from", first)  # fmt: skip
    a, b = read_tensors(first / EXIT_LAYERS), read_tensors(second / EXIT_LAYERS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    t2 = json.loads((second / "soft.json").read_text())["training"]
    # each record lists the shards its CPU-hours count: the first run's, then those too
    assert len(t1["teacher_shards"]) == 1 and set(t1["teacher_shards"]) < set(t2["teacher_shards"])
    curve2 = t2["curve"]
    assert curve2[: len(curve1)] == curve1  # the committed curve, then this run's points
    assert len(curve2) == len(curve1) + 1 and curve2[-1]["cpu_hours"] > curve1[-1]["cpu_hours"]
    for e, v in curve1[-1]["ce"].items():  # the same weights (saved as fp16): the same CE
        assert curve2[-1]["ce"][e] == pytest.approx(v, abs=2e-3)


def test_a_new_exit_joins_a_continued_run_on_the_cache_it_has(
    tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    """--init-from a checkpoint with exits 1, 2 and --exits 1,2,3 --cache-exits 1,2: the
    old exits keep their weights, exit 3 starts as a copy of the base's last layer, the
    curve gains it, and the cache (depths 1 and 2) is reused, not rebuilt."""
    held = write_alpaca(tmp_path / "held.json", 4)
    common = ("--model", tiny_base, "--method", "balcony", "--batch-size", "2",
              "--cache-dir", tmp_path / "tc", "--max-length", "64", "--eval-data", held,
              "--data", data_file)  # fmt: skip
    first = tmp_path / "first"
    run_train(*common, "--exits", "1,2", "--out", first, "--steps", "2", "--lr", "1e-3")
    shards = {d.name for d in (tmp_path / "tc").iterdir()}
    second = tmp_path / "second"
    run_train(*common, "--exits", "1,2,3", "--cache-exits", "1,2", "--out", second,
              "--steps", "1", "--lr", "0", "--init-from", first)  # fmt: skip
    assert {d.name for d in (tmp_path / "tc").iterdir()} == shards
    a, b = read_tensors(first / EXIT_LAYERS), read_tensors(second / EXIT_LAYERS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = read_tensors(tiny_base / "model.safetensors")
    new = {k: v for k, v in b.items() if k.startswith("exits.3.")}
    assert new and all(
        torch.equal(v, base[f"model.layers.3.{k[len('exits.3.') :]}"].half())
        for k, v in new.items()
    )
    training = json.loads((second / "soft.json").read_text())["training"]
    assert training["exits"] == [1, 2, 3, 4] and training["cache_exits"] == [1, 2]
    first_commands = json.loads((first / "soft.json").read_text())["training"]["commands"]
    assert len(first_commands) == 1 and training["commands"][0] == first_commands[0]
    assert len(training["commands"]) == 2 and "--cache-exits" in training["commands"][1]
    assert set(training["curve"][-1]["ce"]) == {"1", "2", "3"}


@pytest.mark.parametrize("cache", ["2", "1,9", "x"])
def test_balcony_bad_cache_exits_exit_2(cache: str, tiny_base: Path, data_file: Path,
                                        tmp_path: Path, capsys) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as e:
        run_train("--model", tiny_base, "--data", data_file, "--out", tmp_path / "o",
                  "--method", "balcony", "--exits", "1,3", "--cache-exits", cache,
                  "--steps", "1", "--cache-dir", tmp_path / "tc")  # fmt: skip
    assert e.value.code == 2
    assert "--cache-exits" in capsys.readouterr().err


def test_balcony_init_from_a_checkpoint_without_exit_layers_exits_2(
    tiny_base: Path, data_file: Path, tmp_path: Path, capsys
) -> None:
    with pytest.raises(SystemExit) as e:
        run_train("--model", tiny_base, "--data", data_file, "--out", tmp_path / "o",
                  "--method", "balcony", "--exits", "1", "--steps", "1",
                  "--cache-dir", tmp_path / "tc", "--init-from", tiny_base)  # fmt: skip
    assert e.value.code == 2
    assert "exit_layers.safetensors" in capsys.readouterr().err


def test_balcony_bad_data_is_reported_with_its_line(tiny_base: Path, tmp_path: Path,
                                                    capsys, caplog) -> None:  # fmt: skip
    good = json.dumps({"instruction": "say hi", "output": "hi"})
    bad = tmp_path / "d.jsonl"
    bad.write_text("\n".join([good, "{not json", good, good]) + "\n")
    common = ("--model", tiny_base, "--data", bad, "--method", "balcony", "--exits", "1",
              "--steps", "1", "--batch-size", "2", "--cache-dir", tmp_path / "tc",
              "--max-length", "64")  # fmt: skip
    with pytest.raises(SystemExit) as e:
        run_train(*common, "--out", tmp_path / "o", "--on-bad-record", "error")
    assert e.value.code == 2 and "d.jsonl:line 2" in capsys.readouterr().err
    run_train(*common, "--out", tmp_path / "o2")  # skipped, named, and the run goes on
    assert "d.jsonl:line 2" in caplog.text
    training = json.loads((tmp_path / "o2" / "soft.json").read_text())["training"]
    assert training["bad_records"] == 1 and training["examples"] == 3


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


def test_a_continued_run_counts_each_shard_of_the_teacher_cache_once() -> None:
    """--init-from a run whose CPU-hours already count some shards' builds: reusing those
    adds nothing; reusing shards no record counts adds their build; what this process
    builds counts as its own CPU time (not through the shards)."""
    from models.training.balcony import ShardedCache, TeacherCache

    def shard(name: str, tokens: int, cpu: float) -> TeacherCache:
        empty = np.zeros(0)
        return TeacherCache(Path(name), (1,), empty, np.array([0, tokens]), {}, empty, empty,
                            empty, cpu_s=cpu)  # fmt: skip

    cache = ShardedCache([shard("a", 100, 10.0), shard("b", 100, 20.0), shard("c", 50, 40.0),
                          shard("d", 80, 80.0)], [0, 1, 2, 3], built=frozenset({"d"}))  # fmt: skip
    assert cache.reused_cpu_s(cache.counted_before(None)) == 70.0  # a fresh run: a, b, c
    listed = cache.counted_before({"teacher_shards": ["a", "c", "x"]})
    assert listed == {"a", "c", "x"} and cache.reused_cpu_s(listed) == 20.0
    # an older record lists none: the leading reused shards up to the tokens it cached
    legacy = cache.counted_before({"tokens": 230, "cpu_hours": 1.0})
    assert legacy == {"a", "b"} and cache.reused_cpu_s(legacy) == 40.0
    assert cache.counted_before({"tokens": 10_000}) == {"a", "b", "c"}  # never past a build
