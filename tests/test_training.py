"""The Trainer: learning, parity with transformers.Trainer, exact resume, crash-safe checkpoints, LoRA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from specformer.generated.distilbert import DistilBertConfig, DistilBertForSequenceClassification
from specformer.generated.llama import LlamaConfig, LlamaForCausalLM
from specformer.runtime.training import (
    DataCollatorForLanguageModeling,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    LoraConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_peft_model,
    load_adapter,
    merge_and_unload,
    save_adapter,
)

ROOT = Path(__file__).resolve().parents[1]


def small_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def counting_data(n: int = 48, length: int = 10) -> list[dict[str, list[int]]]:
    """Sequences that count up modulo 30: easy to learn, so the loss must fall."""
    return [{"input_ids": [(start + i) % 30 + 1 for i in range(length)]} for start in range(n)]


def quiet_args(tmp_path: Path, **overrides) -> TrainingArguments:
    values = {"output_dir": str(tmp_path), "disable_tqdm": True, "save_strategy": "no", "logging_steps": 1}
    return TrainingArguments(**(values | overrides))


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_causal_lm_learns_evaluates_saves_and_reloads(tmp_path: Path) -> None:
    model = small_llama()
    args = quiet_args(tmp_path, max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3,
                      eval_strategy="steps", eval_steps=15, report_to="jsonl")  # fmt: skip
    data = counting_data()
    trainer = Trainer(
        model, args, DataCollatorForLanguageModeling(mlm=False), train_dataset=data, eval_dataset=data[:16]
    )
    before = trainer.evaluate()["eval_loss"]
    result = trainer.train()
    after = trainer.evaluate()["eval_loss"]
    curve = losses(trainer)
    assert result.global_step == 30
    assert curve[-1] < 0.6 * curve[0] and after < 0.6 * before
    assert (tmp_path / "loss_lr.png").read_bytes().startswith(b"\x89PNG")
    logged = [json.loads(line) for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    assert any("eval_loss" in line for line in logged) and logged[0]["step"] == 0
    trainer.save_model(str(tmp_path / "final"))
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "final")
    ids = torch.tensor([data[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_sequence_classifier_learns(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=40, dim=32, hidden_dim=64, n_layers=2, n_heads=4, num_labels=2,
                              dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)  # fmt: skip
    model = DistilBertForSequenceClassification(config)
    generator = torch.Generator().manual_seed(0)
    data = []
    for _ in range(64):
        length = int(torch.randint(4, 9, (1,), generator=generator))
        ids = torch.randint(3, 40, (length,), generator=generator).tolist()
        data.append({"input_ids": ids, "label": int((sum(ids) % 2 == 0 and 7 in ids) or ids[0] > 20)})

    def accuracy(prediction) -> dict[str, float]:
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).float().mean())}

    args = quiet_args(tmp_path, num_train_epochs=12, per_device_train_batch_size=16, learning_rate=2e-3,
                      logging_steps=4)  # fmt: skip
    trainer = Trainer(model, args, DataCollatorWithPadding(), train_dataset=data, eval_dataset=data,
                      compute_metrics=accuracy)  # fmt: skip
    start = trainer.evaluate()
    trainer.train()
    end = trainer.evaluate()
    assert end["eval_loss"] < 0.7 * start["eval_loss"] and end["eval_accuracy"] > 0.8
    trainer.save_model(str(tmp_path / "clf"))
    again = DistilBertForSequenceClassification.from_pretrained(tmp_path / "clf")
    assert Trainer(again, args, DataCollatorWithPadding(), eval_dataset=data).evaluate()[
        "eval_loss"
    ] == pytest.approx(end["eval_loss"], abs=1e-6)


def test_loss_curve_matches_transformers_trainer(tmp_path: Path) -> None:
    """Same weights, data order and settings; gradient accumulation with loss normalised by label tokens."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config)
    reference.save_pretrained(tmp_path / "init")
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "init")
    data = []
    for i, example in enumerate(counting_data(40)):
        labels = list(example["input_ids"])
        labels[: i % 5] = [-100] * (i % 5)  # uneven label counts: the normalisation matters
        data.append({"input_ids": example["input_ids"], "labels": labels})
    common = {"max_steps": 20, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
              "learning_rate": 2e-3, "weight_decay": 0.01, "warmup_steps": 3, "logging_steps": 1,
              "save_strategy": "no", "report_to": "none", "train_sampling_strategy": "sequential",
              "optim": "adamw_torch", "seed": 0, "disable_tqdm": True, "dataloader_pin_memory": False}  # fmt: skip
    hf_args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), use_cpu=True, **common)
    hf_trainer = transformers.Trainer(reference, hf_args, train_dataset=data)
    hf_trainer.train()
    expected = [h["loss"] for h in hf_trainer.state.log_history if "loss" in h]
    trainer = Trainer(
        ours, TrainingArguments(output_dir=str(tmp_path / "ours"), plot=False, **common), train_dataset=data
    )
    trainer.train()
    assert len(expected) == 20
    assert losses(trainer) == pytest.approx(expected, abs=1e-4)


def _resume_args(tmp_path: Path, steps: int) -> TrainingArguments:
    return quiet_args(tmp_path, max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                      learning_rate=2e-3, save_strategy="steps", save_steps=10, plot=False)  # fmt: skip


def test_resume_continues_exactly(tmp_path: Path) -> None:
    data = counting_data(40)
    whole = Trainer(small_llama(), _resume_args(tmp_path / "whole", 20),
                    DataCollatorForLanguageModeling(mlm=False), train_dataset=data)  # fmt: skip
    whole.train()

    class StopAtTen(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs) -> None:
            if state.global_step == 10:
                control.should_training_stop = True

    first = Trainer(small_llama(), _resume_args(tmp_path / "split", 20),
                    DataCollatorForLanguageModeling(mlm=False), train_dataset=data, callbacks=[StopAtTen()])  # fmt: skip
    first.train()
    assert (tmp_path / "split" / "checkpoint-10" / "optimizer.pt").exists()
    second = Trainer(small_llama(seed=1), _resume_args(tmp_path / "split", 20),
                     DataCollatorForLanguageModeling(mlm=False), train_dataset=data)  # fmt: skip
    second.train(resume_from_checkpoint=True)
    assert losses(first) + losses(second)[-10:] == losses(whole)
    for (name, a), b in zip(
        whole.model.state_dict().items(), second.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_rotation_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    data = counting_data(32)
    args = quiet_args(tmp_path, max_steps=8, per_device_train_batch_size=8, learning_rate=3e-3, save_strategy="steps",
                      save_steps=2, eval_strategy="steps", eval_steps=2, save_total_limit=2,
                      load_best_model_at_end=True, metric_for_best_model="loss", plot=False)  # fmt: skip

    class WorseLater(TrainerCallback):  # make the step-2 evaluation look best
        def on_evaluate(self, args, state, control, **kwargs) -> None:
            if state.global_step == 2:
                kwargs["metrics"]["eval_loss"] = -1.0

    trainer = Trainer(small_llama(), args, DataCollatorForLanguageModeling(mlm=False), train_dataset=data,
                      eval_dataset=data[:8])  # fmt: skip
    trainer.callback_handler.callbacks.insert(0, WorseLater())
    trainer.train()
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert "checkpoint-2" in kept and "checkpoint-8" in kept and len(kept) == 2
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")


KILLED_SAVE = """
import os, sys, torch
from specformer.runtime.training import Trainer, TrainingArguments, DataCollatorForLanguageModeling
sys.path.insert(0, {tests!r})
from test_training import small_llama, counting_data
import specformer.runtime.training.checkpoints as trainer_module
real = trainer_module.save_state_dict
def save_then_die(state, directory, *a, **k):
    real(state, directory, *a, **k)
    if "checkpoint-8" in str(directory):
        print("dying", flush=True)
        os.kill(os.getpid(), 9)
trainer_module.save_state_dict = save_then_die
args = TrainingArguments(output_dir={out!r}, max_steps=8, per_device_train_batch_size=4, save_steps=4,
                         logging_steps=1, disable_tqdm=True, plot=False)
Trainer(small_llama(), args, DataCollatorForLanguageModeling(mlm=False), train_dataset=counting_data(40)).train()
"""


def test_kill_during_checkpoint_save_leaves_the_previous_one(tmp_path: Path) -> None:
    code = textwrap.dedent(KILLED_SAVE.format(tests=str(ROOT / "tests"), out=str(tmp_path)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL and "dying" in result.stdout, result.stderr
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").exists()
    assert not (tmp_path / "checkpoint-8").exists()  # the half-written one never got its name
    args = quiet_args(
        tmp_path, max_steps=8, per_device_train_batch_size=4, save_steps=4, save_strategy="steps"
    )
    trainer = Trainer(
        small_llama(), args, DataCollatorForLanguageModeling(mlm=False), train_dataset=counting_data(40)
    )
    assert trainer.last_checkpoint().endswith("checkpoint-4")
    assert trainer.train(resume_from_checkpoint=True).global_step == 8


def test_lora_trains_only_adapters_and_merges(tmp_path: Path) -> None:
    model = get_peft_model(small_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    args = quiet_args(tmp_path, max_steps=15, per_device_train_batch_size=8, learning_rate=1e-2)
    trainer = Trainer(model, args, DataCollatorForLanguageModeling(mlm=False), train_dataset=counting_data())
    trainer.train()
    assert losses(trainer)[-1] < losses(trainer)[0]
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"{name} changed"
    trainer.save_model(str(tmp_path / "adapter"))
    assert sorted(os.listdir(tmp_path / "adapter"))[:2] == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    reloaded = assert_adapter_round_trip(model, small_llama(), tmp_path / "adapter")
    save_adapter(reloaded, tmp_path / "again")


def assert_adapter_round_trip(
    model: torch.nn.Module, fresh: torch.nn.Module, folder: Path
) -> torch.nn.Module:
    """The adapter saved in `folder`, loaded onto a fresh base, gives the adapted model's logits, and so
    does the adapted model merged into plain layers. Returns the reloaded model."""
    ids = torch.tensor([counting_data()[3]["input_ids"]])
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
        reloaded = load_adapter(fresh, folder).eval()
        torch.testing.assert_close(reloaded(ids).logits, adapted, atol=1e-6, rtol=0)
        merged = merge_and_unload(model)
        assert not any("lora" in n or "adapter" in n for n in merged.state_dict())
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=0)
    return reloaded


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    ids = torch.tensor([counting_data()[0]["input_ids"]])
    grads = []
    for checkpointing in (False, True):
        model = small_llama()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_a_compiled_step_gives_the_eager_losses(tmp_path: Path) -> None:
    """torch_compile=True: the blocks compiled, the fused loss left as it is (a graph break), same curve."""
    curves = []
    for compiled in (False, True):
        args = quiet_args(tmp_path / str(compiled), max_steps=3, per_device_train_batch_size=8,
                          learning_rate=3e-3, torch_compile=compiled, plot=False)  # fmt: skip
        trainer = Trainer(small_llama(), args, DataCollatorForLanguageModeling(mlm=False),
                          train_dataset=counting_data(24))  # fmt: skip
        trainer.train()
        curves.append(losses(trainer))
    assert curves[1] == pytest.approx(curves[0], abs=1e-5)


def test_collators_and_arguments(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    mlm = DataCollatorForLanguageModeling(
        mask_token_id=99, vocab_size=100, mlm_probability=0.5, generator=generator
    )
    batch = mlm([{"input_ids": list(range(1, 41))}, {"input_ids": list(range(1, 21))}])
    chosen = batch["labels"] != -100
    assert batch["attention_mask"][1, 20:].sum() == 0 and not chosen[1, 20:].any()  # padding never chosen
    assert 0.3 < chosen[0].float().mean() < 0.7
    assert (batch["input_ids"][chosen] == 99).float().mean() > 0.6  # about 80 % become the mask token
    tokens = DataCollatorForTokenClassification()(
        [{"input_ids": [5, 6, 7], "labels": [1, 2, 3]}, {"input_ids": [5], "labels": [4]}]
    )
    assert tokens["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    args = TrainingArguments(output_dir=str(tmp_path), lr_scheduler_type="cosine", warmup_ratio=0.1)
    args.save(tmp_path / "args.json")
    assert TrainingArguments.from_json_file(tmp_path / "args.json") == args
    with pytest.raises(ValueError, match="`optim` is 'adam'; expected one of"):
        TrainingArguments(optim="adam")
    with pytest.raises(ValueError, match="load_best_model_at_end needs an eval_strategy"):
        TrainingArguments(load_best_model_at_end=True)
    with pytest.raises(ValueError, match="no DeepSpeed integration; under torchrun, fsdp=True shards"):
        TrainingArguments(deepspeed="ds_config.json")


def _distributed_rank(rank: int, world: int, folder: str, port: int, fsdp: bool) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        args = TrainingArguments(output_dir=folder, max_steps=6, per_device_train_batch_size=4, logging_steps=1,
                                 gradient_accumulation_steps=2, learning_rate=3e-3, train_sampling_strategy="sequential",
                                 disable_tqdm=True, save_strategy="no", plot=False, fsdp=fsdp)  # fmt: skip
        trainer = Trainer(
            small_llama(), args, DataCollatorForLanguageModeling(mlm=False), train_dataset=_ragged_data()
        )
        trainer.train()
        if rank == 0:
            Path(folder, "losses.json").write_text(json.dumps(losses(trainer)))
    finally:
        dist.destroy_process_group()
    # Leave without interpreter teardown: gloo's threads at exit sometimes abort the process
    # ("terminate called without an active exception") after all the work is done.
    sys.stdout.flush()
    os._exit(0)


def _ragged_data() -> list[dict[str, list[int]]]:
    """Examples of different lengths, so ranks see different token counts."""
    return [{"input_ids": ex["input_ids"][: 6 + i % 5]} for i, ex in enumerate(counting_data(48))]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_reproduce_one(fsdp: bool, tmp_path: Path) -> None:
    import torch.multiprocessing as mp
    from test_tensor_parallel import free_port

    single = Trainer(small_llama(), quiet_args(tmp_path / "one", max_steps=6, per_device_train_batch_size=8,
                                               gradient_accumulation_steps=2, learning_rate=3e-3,
                                               train_sampling_strategy="sequential", plot=False),
                     DataCollatorForLanguageModeling(mlm=False), train_dataset=_ragged_data())  # fmt: skip
    single.train()
    mp.spawn(_distributed_rank, args=(2, str(tmp_path), free_port(), fsdp), nprocs=2)
    assert json.loads((tmp_path / "losses.json").read_text()) == pytest.approx(losses(single), abs=1e-5)


def test_qlora_on_a_4bit_base(tmp_path: Path) -> None:
    """LoRA adapters over bitsandbytes 4-bit layers: only the adapters train, and the loss falls."""
    bnb = pytest.importorskip("bitsandbytes")
    from specformer.runtime.quantization import BitsAndBytesConfig

    small_llama().save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(
        tmp_path / "base",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    )
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    args = quiet_args(tmp_path / "run", max_steps=12, per_device_train_batch_size=8, learning_rate=1e-2)
    trainer = Trainer(model, args, DataCollatorForLanguageModeling(mlm=False), train_dataset=counting_data())
    trainer.train()
    assert losses(trainer)[-1] < losses(trainer)[0]
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_early_stopping_stops_when_the_metric_stops_improving(tmp_path: Path) -> None:
    class Plateau(TrainerCallback):  # evaluation loss improves twice, then never again
        def on_evaluate(self, args, state, control, **kwargs) -> None:
            kwargs["metrics"]["eval_loss"] = max(3.0 - state.global_step, 1.0)

    args = quiet_args(tmp_path, max_steps=50, per_device_train_batch_size=8, eval_strategy="steps", eval_steps=1,
                      metric_for_best_model="loss", plot=False)  # fmt: skip
    trainer = Trainer(small_llama(), args, DataCollatorForLanguageModeling(mlm=False), train_dataset=counting_data(),
                      eval_dataset=counting_data(8), callbacks=[EarlyStoppingCallback(early_stopping_patience=3)])  # fmt: skip
    trainer.callback_handler.callbacks.insert(0, Plateau())
    assert trainer.train().global_step == 5  # best at step 2; steps 3, 4 and 5 do not improve


@pytest.mark.parametrize(
    "kind", ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
)
def test_schedules_match_transformers(kind: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from specformer.runtime.training.optim import create_scheduler

    def rates(scheduler, optimizer) -> list[float]:
        out = []
        for _ in range(30):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=0.1, lr_scheduler_type=kind, warmup_steps=5
    )
    theirs_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    theirs = transformers.get_scheduler(kind, theirs_opt, num_warmup_steps=5, num_training_steps=25)
    assert rates(create_scheduler(ours_opt, args, 25), ours_opt) == pytest.approx(
        rates(theirs, theirs_opt), abs=1e-12
    )


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "adamw_bnb_8bit"])
def test_every_optimizer_trains(optim: str, tmp_path: Path) -> None:
    if optim == "adamw_bnb_8bit":
        pytest.importorskip("bitsandbytes")
    rate = {"sgd": 0.5, "adafactor": 1e-2}.get(optim, 3e-3)
    args = quiet_args(tmp_path, max_steps=12, per_device_train_batch_size=8, learning_rate=rate, optim=optim,
                      weight_decay=0.01, plot=False)  # fmt: skip
    trainer = Trainer(
        small_llama(), args, DataCollatorForLanguageModeling(mlm=False), train_dataset=counting_data()
    )
    trainer.train()
    curve = losses(trainer)
    assert curve[-1] < curve[0], (optim, curve)
    groups = trainer.optimizer.param_groups
    assert {g["weight_decay"] for g in groups} == {0.01, 0.0}  # no decay on norms and biases


def small_mixtral(seed: int = 0) -> torch.nn.Module:
    from specformer.generated.mixtral import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           output_router_logits=True, router_aux_loss_coef=0.02)  # fmt: skip
    return MixtralForCausalLM(config)


def test_lora_on_experts_fine_tunes_a_mixture_of_experts(tmp_path: Path) -> None:
    """The Trainer on a mixture of experts, its loss with the load-balancing term: LoRA on the attention
    projections and on every expert (a low-rank update per expert), saved, reloaded and merged."""
    model = get_peft_model(
        small_mixtral(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "experts"])
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "model.layers.0.mlp.experts.adapter.gate_up_proj_A" in trainable
    assert all(".lora_" in n or ".adapter." in n for n in trainable)
    args = quiet_args(tmp_path, max_steps=15, per_device_train_batch_size=8, learning_rate=1e-2)
    trainer = Trainer(model, args, DataCollatorForLanguageModeling(mlm=False), train_dataset=counting_data())
    trainer.train()
    assert losses(trainer)[-1] < losses(trainer)[0]
    adapter = model.model.layers[0].mlp.experts.adapter
    assert adapter.gate_up_proj_B.abs().sum() > 0 and adapter.down_proj_B.abs().sum() > 0  # experts learnt
    trainer.save_model(str(tmp_path / "adapter"))
    assert_adapter_round_trip(model, small_mixtral(), tmp_path / "adapter")
