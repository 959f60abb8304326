"""soft-train: the sorted loss against a naive reference, the LoRA/full/early-exit/delta
outputs through models.load, --resume, bad CLI input, and a 2-process gloo run."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models
from models.checkpoint import EXIT_HEADS, read_tensors
from models.training.data import IGNORE, collate, load_dataset
from models.training.sorted_loss import FrozenTeacher, SortedLoss, default_exits
from models.training.train import final_loss
from models.training.train import main as train_main
from tests.conftest import make_hf_model
from tests.training.test_data import make_tokenizer, write_alpaca

ROOT = Path(__file__).resolve().parents[2]


def run_train(*args: str | Path) -> None:
    train_main([str(a) for a in (*args, "--no-progress", "--threads", "1")])


def naive_exit_ce(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, d: int
                  ) -> torch.Tensor:  # fmt: skip
    """Sub-model d built by hand: a truncated copy of the decoder, full logits."""
    import copy

    sub = copy.deepcopy(model)
    sub.model.layers = sub.model.layers[:d]
    sub.config.num_hidden_layers = d
    logits = sub(input_ids=ids).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=IGNORE)  # fmt: skip


def test_sorted_loss_is_the_mean_of_naive_per_exit_losses(tmp_path: Path) -> None:
    model = make_hf_model(seed=1)
    tok = make_tokenizer()
    ds = load_dataset(write_alpaca(tmp_path / "d.json", 3), tok)
    b = collate(ds.examples, 0)
    b_ids, labels = b.input_ids, b.labels
    wrapper = SortedLoss(model, [1, 2, 4])
    out = wrapper(b_ids, labels, b.attention_mask)
    naive = [naive_exit_ce(model, b_ids, labels, d) for d in (1, 2, 4)]
    tokens = int((labels[:, 1:] != IGNORE).sum())
    assert out.tokens == tokens
    torch.testing.assert_close(out.per_exit / tokens, torch.stack(naive).detach())
    torch.testing.assert_close(out.loss, torch.stack(naive).mean())
    # weights: a weighted mean; gradients flow to the shared head from every exit
    w = SortedLoss(make_hf_model(seed=1), [1, 2, 4], weights=[1, 0, 3])
    out_w = w(b_ids, labels, b.attention_mask)
    torch.testing.assert_close(out_w.loss, (naive[0] + 3 * naive[2]) / 4)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None
    assert model.model.layers[3].mlp.down_proj.weight.grad is not None


@pytest.mark.parametrize("all_tokens", [False, True])
def test_distillation_mixes_ce_with_kl_to_the_teachers_full_depth(
    tmp_path: Path, all_tokens: bool
) -> None:
    tok = make_tokenizer()
    b = collate(load_dataset(write_alpaca(tmp_path / "d.json", 3), tok).examples, 0)
    ids, labels, mask = b.input_ids, b.labels, b.attention_mask
    student, teacher_model = make_hf_model(seed=1), make_hf_model(seed=5)
    teacher = FrozenTeacher(teacher_model)
    wrapper = SortedLoss(student, [1, 2, 4], distill=0.25, teacher=teacher,
                         distill_all_tokens=all_tokens)  # fmt: skip
    out = wrapper(ids, labels, mask)
    resp = labels[:, 1:] != IGNORE
    pos = mask[:, 1:].bool() if all_tokens else resp
    t_logp = F.log_softmax(teacher_model(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
    mixed = []
    for d in (1, 2, 4):
        sub = copy.deepcopy(student)
        sub.model.layers = sub.model.layers[:d]
        logp = F.log_softmax(sub(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
        ce = -logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0][resp].mean()
        kl = (t_logp.exp() * (t_logp - logp)).sum(-1)[pos].mean()
        mixed.append(0.75 * ce + 0.25 * kl)
        i = (1, 2, 4).index(d)
        torch.testing.assert_close(out.per_exit[i] / out.tokens, ce.detach())
        assert out.per_exit_kl is not None
        torch.testing.assert_close(out.per_exit_kl[i] / out.kl_tokens, kl.detach())
    assert out.kl_tokens == int(pos.sum()) and out.tokens == int(resp.sum())
    torch.testing.assert_close(out.loss, torch.stack(mixed).mean())
    out.loss.backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert all(p.grad is None for p in teacher_model.parameters())


def test_lora_teacher_is_the_untrained_model(tmp_path: Path) -> None:
    from models.training.train import add_lora

    tok = make_tokenizer()
    b = collate(load_dataset(write_alpaca(tmp_path / "d.json", 2), tok).examples, 0)
    reference = make_hf_model(seed=1)
    want = reference(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    model = make_hf_model(seed=1)
    peft_model = add_lora(model, 4, 8.0)
    teacher = FrozenTeacher(model, peft_model)
    with torch.no_grad():  # "training" moved the adapter and the final norm
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith("model.norm.weight"):
                p.add_(0.5)
    trained = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert (trained - want).abs().max() > 1e-2
    torch.testing.assert_close(teacher(b.input_ids, b.attention_mask), want)
    # and the trained weights are back in place afterwards
    torch.testing.assert_close(
        model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, trained
    )


def test_gradient_checkpointing_gives_the_same_loss_and_grads(tmp_path: Path) -> None:
    tok = make_tokenizer()
    b = collate(load_dataset(write_alpaca(tmp_path / "d.json", 2), tok).examples, 0)
    grads = []
    for ckpt in (False, True):
        model = make_hf_model(seed=2)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
        out = SortedLoss(model, [2, 4])(b.input_ids, b.labels, b.attention_mask)
        out.loss.backward()
        grads.append((out.loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_default_exits_span_30_to_100_percent() -> None:
    assert default_exits(40) == (12, 16, 20, 24, 28, 32, 36, 40)
    assert default_exits(30) == (9, 12, 15, 18, 21, 24, 27, 30)
    assert default_exits(4) == (1, 2, 3, 4)


def test_full_soft_checkpoint_loads_with_exits(tiny_base: Path, data_file: Path,
                                               tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "soft"
    run_train("--model", tiny_base, "--data", data_file, "--out", out, "--exits", "2,4",
              "--steps", "2", "--batch-size", "2", "--save-every", "0")  # fmt: skip
    m = models.load(out)
    assert m.exits == (2, 4) and m.method == "soft"
    training = json.loads((out / "soft.json").read_text())["training"]
    assert training["steps"] == 2 and training["exits"] == [2, 4]
    assert training["command"].startswith("soft-train --model")
    assert len(training["data_sha256"]) == 64 and set(training["final_losses"]) == {"2", "4"}
    base = models.load(tiny_base)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(m.logits(ids, 2), base.logits(ids, 2))  # it trained


def test_lora_merged_and_delta_give_the_same_model(tiny_base: Path, data_file: Path,
                                                   tmp_path: Path) -> None:  # fmt: skip
    common = (
        "--model",
        tiny_base,
        "--data",
        data_file,
        "--exits",
        "2,3,4",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--lora-rank",
        "4",
        "--lr",
        "1e-2",
        "--save-every",
        "0",
    )
    run_train(*common, "--out", tmp_path / "merged")
    run_train(*common, "--out", tmp_path / "delta", "--save-delta")
    assert not list((tmp_path / "delta").glob("model*.safetensors"))
    # full weights load unmodified in transformers 4.x / vLLM / llama.cpp's converter: the
    # architecture named, rope_theta beside transformers 5's rope_parameters
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    base_cfg = json.loads((tiny_base / "config.json").read_text())
    theta = (base_cfg.get("rope_parameters") or {}).get("rope_theta", base_cfg.get("rope_theta"))
    assert written["architectures"] == ["LlamaForCausalLM"]
    assert theta is not None and written["rope_theta"] == theta
    assert written["torch_dtype"] == "float32"
    merged, delta = models.load(tmp_path / "merged"), models.load(tmp_path / "delta")
    base = models.load(tiny_base)
    assert merged.exits == delta.exits == (2, 3, 4)
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    for d in (2, 4):
        # the delta stores LoRA factors in bf16: equal to the merged model up to that
        torch.testing.assert_close(delta.logits(ids, d), merged.logits(ids, d),
                                   atol=2e-2, rtol=2e-2)  # fmt: skip
        assert not torch.allclose(merged.logits(ids, d), base.logits(ids, d), atol=1e-3)
    trained_norm = read_tensors(tmp_path / "delta" / "soft_delta.safetensors")["model.norm.weight"]
    assert not torch.equal(trained_norm, base.norm.float())  # the final norm trains too


@pytest.mark.parametrize("lora", [False, True])
def test_distilled_training_runs_and_records_its_objective(
    tiny_base: Path, data_file: Path, tmp_path: Path, lora: bool
) -> None:
    out = tmp_path / "distilled"
    extra = ("--lora-rank", "4", "--save-delta") if lora else ()
    run_train("--model", tiny_base, "--data", data_file, "--out", out, "--exits", "2,4",
              "--steps", "2", "--batch-size", "2", "--save-every", "0", "--distill", "0.5",
              "--distill-tokens", "all", *extra)  # fmt: skip
    training = json.loads((out / "soft.json").read_text())["training"]
    assert training["distill"] == 0.5 and training["distill_tokens"] == "all"
    ids = torch.tensor([[5, 6, 7, 8]])
    base = models.load(tiny_base)
    assert not torch.allclose(models.load(out).logits(ids, 2), base.logits(ids, 2))


def test_sft_trains_only_the_last_layer_exit(tiny_base: Path, data_file: Path,
                                             tmp_path: Path) -> None:  # fmt: skip
    run_train(
        "--model",
        tiny_base,
        "--data",
        data_file,
        "--out",
        tmp_path / "sft",
        "--method",
        "sft",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--save-every",
        "0",
    )
    assert models.load(tmp_path / "sft").exits == (4,)


def test_early_exit_heads_are_written_and_used(tiny_base: Path, data_file: Path,
                                               tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "ee"
    run_train("--model", tiny_base, "--data", data_file, "--out", out, "--method",
              "early-exit", "--exits", "2,3", "--steps", "2", "--batch-size", "2",
              "--lr", "1e-2", "--save-every", "0")  # fmt: skip
    heads = read_tensors(out / EXIT_HEADS)
    assert sorted(heads) == ["exits.2.lm_head.weight", "exits.2.norm.weight",
                             "exits.3.lm_head.weight", "exits.3.norm.weight"]  # fmt: skip
    m, base = models.load(out), models.load(tiny_base)
    assert m.method == "early-exit" and m.exits == (2, 3, 4)
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(m.logits(ids, 4), base.logits(ids, 4))  # backbone frozen
    assert not torch.allclose(m.logits(ids, 2), base.logits(ids, 2), atol=1e-3)
    h = m.hidden(ids, torch.arange(4)[None], [2])  # (1, T, H) before any norm
    norm, w = heads["exits.2.norm.weight"].float(), heads["exits.2.lm_head.weight"].float()
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm
    torch.testing.assert_close(m.logits(ids, 2), x @ w.T, atol=1e-4, rtol=1e-4)


def test_resume_continues_from_the_saved_step(
    tiny_base: Path, data_file: Path, tmp_path: Path, caplog
) -> None:
    common = ("--model", tiny_base, "--data", data_file, "--exits", "2,4", "--batch-size",
              "2", "--lora-rank", "4", "--lr", "1e-2", "--save-every", "3", "--save-delta",
              "--warmup", "1")  # fmt: skip
    straight = tmp_path / "straight"
    run_train(*common, "--steps", "4", "--out", straight)
    state = torch.load(straight / "resume" / "state.pt", weights_only=True)
    assert state["step"] == 4 and len(state["history"]) == 4  # the last step is saved too
    # stop after 2 steps (same LRs so far: warmup 1, cosine at its start), then continue
    part = tmp_path / "part"
    run_train(*common, "--steps", "2", "--out", part)
    assert torch.load(part / "resume" / "state.pt", weights_only=True)["step"] == 2
    caplog.set_level("INFO", logger="soft-train")
    run_train(*common, "--steps", "4", "--out", part, "--resume")
    assert "at step 2" in caplog.text
    a, b = models.load(straight), models.load(part)
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(a.logits(ids, 2), b.logits(ids, 2), atol=1e-5, rtol=1e-5)
    ta = json.loads((straight / "soft.json").read_text())["training"]
    tb = json.loads((part / "soft.json").read_text())["training"]
    assert tb["steps"] == 4 and tb["final_losses"] == ta["final_losses"]
    assert len(tb["commands"]) == 2 and tb["commands"][1] == tb["command"]
    assert "--resume" in tb["command"] and "--steps 2" in tb["commands"][0]


def test_resume_may_add_an_exit(tiny_base: Path, data_file: Path, tmp_path: Path) -> None:
    common = ("--model", tiny_base, "--data", data_file, "--batch-size", "2", "--lora-rank",
              "4", "--lr", "1e-2", "--save-every", "2", "--save-delta",
              "--out", tmp_path / "r")  # fmt: skip
    run_train(*common, "--exits", "2,4", "--steps", "2")
    # an old state (rows as plain lists) is read with the exits of OUT/soft.json
    state_path = tmp_path / "r" / "resume" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    state["history"] = [[h["2"], h["4"]] for h in state["history"]]
    torch.save(state, state_path)
    run_train(*common, "--exits", "1,2,4", "--steps", "4", "--resume")
    training = json.loads((tmp_path / "r" / "soft.json").read_text())["training"]
    assert training["exits"] == [1, 2, 4] and training["steps"] == 4
    assert set(training["final_losses"]) == {"1", "2", "4"}
    rows = torch.load(state_path, weights_only=True)["history"]
    assert [sorted(h) for h in rows] == [["2", "4"]] * 2 + [["1", "2", "4"]] * 2
    assert models.load(tmp_path / "r").exits == (1, 2, 4)


def test_final_loss_averages_the_steps_that_trained_the_exit() -> None:
    history = [{"2": 9.0, "4": 1.0}, {"2": 3.0, "4": 2.0}, {"1": 5.0, "2": 1.0, "4": 3.0}]
    assert final_loss(history, 1) == 5.0 and final_loss(history, 2, last=2) == 2.0
    assert math.isnan(final_loss(history, 3))


def test_resume_of_an_unknown_old_state_exits_2(tiny_base: Path, data_file: Path,
                                                tmp_path: Path, capsys) -> None:  # fmt: skip
    common = ("--model", tiny_base, "--data", data_file, "--batch-size", "2", "--lora-rank",
              "4", "--save-every", "1", "--out", tmp_path / "r", "--save-delta")  # fmt: skip
    run_train(*common, "--exits", "2,4", "--steps", "1")
    state_path = tmp_path / "r" / "resume" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    state["history"] = [[1.0, 2.0, 3.0]]  # three losses, soft.json lists two exits
    torch.save(state, state_path)
    with pytest.raises(SystemExit) as e:
        train_main([str(a) for a in (*common, "--exits", "2,4", "--steps", "2", "--resume")])
    assert e.value.code == 2 and "original --exits" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [
    ["--exits", "0,9"], ["--exits", "a,b"], ["--exit-weights", "1"], ["--steps", "0"],
    ["--method", "nope"], ["--save-delta"], ["--data", "/nonexistent.json"], ["--distill", "1.5"],
])  # fmt: skip
def test_bad_cli_input_exits_2_with_a_message(bad: list[str], tiny_base: Path, data_file: Path,
                                              tmp_path: Path, capsys) -> None:  # fmt: skip
    args = ["--model", str(tiny_base), "--data", str(data_file), "--out", str(tmp_path / "o"),
            "--exits", "2,4", *bad]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        train_main(args)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bad_records_error_mode_exits_2(tiny_base: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(SystemExit) as e:
        train_main(["--model", str(tiny_base), "--data", str(path), "--out", str(tmp_path / "o"),
                    "--on-bad-record", "error"])  # fmt: skip
    assert e.value.code == 2
    assert "d.jsonl:line 2" in capsys.readouterr().err


def test_torchrun_two_processes_gloo(tiny_base: Path, data_file: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # torchrun's static rendezvous needs a concrete free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(port), "-m", "models.training.train", "--model", str(tiny_base),
           "--data", str(data_file), "--out", str(out), "--exits", "2,4", "--steps", "2",
           "--batch-size", "1", "--grad-accum", "2", "--save-every", "0",
           "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    training = json.loads((out / "soft.json").read_text())["training"]
    assert training["world_size"] == 2 and training["steps"] == 2
    assert models.load(out).exits == (2, 4)
