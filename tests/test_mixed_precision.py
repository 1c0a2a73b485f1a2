"""Mixed precision: the whole recipe (KD, pruning, QAT) trains under ``torch.autocast`` (bf16 on
CPU) and under the Trainer's ``bf16=True``, with KD terms in fp32, close to fp32 training."""

import contextlib

import torch
import transformers

import slimkit
from slimkit.plugins.hf import slim_callbacks
from tests.families import hf_model, timm_model
from tests.test_hf_trainer import ToyText, make_args
from tests.test_pipeline import BERT_RECIPE, CNN_RECIPE, X, Y


def plain_loop(bf16: bool):
    teacher, student = timm_model("resnet-wide", seed=1), timm_model("resnet", seed=2)
    slimkit.prepare(student, CNN_RECIPE, teacher=teacher, example_inputs=X[:2])
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses, dtypes = [], set()
    student.train()
    for _ in range(12):
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = student(X)
            loss = slimkit.compute_loss(student, out, labels=Y)
        dtypes.add((out.dtype, loss.dtype))
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        slimkit.step(student)
        values = slimkit.log_values(student)
    assert values["quant/phase"] == 2.0  # QAT ran, ranges frozen
    student.eval()
    with torch.no_grad():
        fake_quant = student(X)
    pruned = student.slimkit.prune.channels_pruned.clone()
    small = slimkit.convert(student)
    with torch.no_grad():
        int8 = small(X)
    return torch.tensor(losses), dtypes, pruned, fake_quant, int8


def test_autocast_bf16_trains_the_whole_recipe_close_to_fp32():
    ref_losses, ref_dtypes, ref_pruned, ref_fq, _ = plain_loop(bf16=False)
    losses, dtypes, pruned, fq, int8 = plain_loop(bf16=True)
    assert ref_dtypes == {(torch.float32, torch.float32)}
    # the student ran in bf16, the loss (KD, features, task) was computed in fp32
    assert dtypes == {(torch.bfloat16, torch.float32)}
    assert torch.isfinite(losses).all() and torch.isfinite(int8).all()
    torch.testing.assert_close(losses, ref_losses, rtol=0.02, atol=0.0)
    # the same number of channels removed, nearly all the same ones (near-ties may swap)
    assert int(pruned.sum()) == int(ref_pruned.sum())
    assert (pruned == ref_pruned).float().mean() >= 0.9, (pruned == ref_pruned).float().mean()
    # the trained fake-quant models fit the data equally well
    ce, ref_ce = (torch.nn.functional.cross_entropy(o, Y).item() for o in (fq, ref_fq))
    assert abs(ce - ref_ce) <= 0.03 * ref_ce, (ce, ref_ce)


def trainer_run(tmp_path, bf16: bool):
    teacher, student = hf_model("bert", seed=1, num_hidden_layers=4, hidden_size=48), hf_model("bert", seed=2)
    callbacks = slim_callbacks(student, BERT_RECIPE, teacher=teacher)
    seen = set()
    layer = student.bert.encoder.layer[0].intermediate.dense
    handle = layer.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    args = make_args(tmp_path / f"bf16-{bf16}", max_steps=8, bf16=bf16)
    trainer = transformers.Trainer(model=student, args=args, train_dataset=ToyText(), callbacks=callbacks)
    trainer.train()
    handle.remove()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return logs, seen


def test_trainer_bf16_matches_fp32_training(tmp_path):
    ref, ref_seen = trainer_run(tmp_path, bf16=False)
    logs, seen = trainer_run(tmp_path, bf16=True)
    assert ref_seen == {torch.float32} and seen == {torch.bfloat16}  # the Trainer's autocast was on
    assert logs[-1]["quant/phase"] == 2.0 and logs[-1]["prune/heads"] == 0.5
    for term in ("loss", "distill/kd", "distill/task", "distill/feature.bert.encoder.layer.1"):
        a = torch.tensor([e[term] for e in ref])
        b = torch.tensor([e[term] for e in logs])
        assert torch.isfinite(b).all(), term
        torch.testing.assert_close(b, a, rtol=0.05, atol=1e-5, msg=term)
