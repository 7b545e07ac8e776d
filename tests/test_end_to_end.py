"""Train → merge on tiny random models: the merged checkpoint, loaded by plain transformers, equals NF4 + adapter."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from conftest import ROOT, slow
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qlora_pipe import UserError, cli, model
from qlora_pipe.config import load_recipe
from qlora_pipe.generate import chat, generate, reply
from qlora_pipe.merge import merge
from qlora_pipe.train import build_trainer

PROMPTS = [
    "Which topic is this about: sports, food or tech?\nText: The team won the match.",
    "Classify the sentiment of this review as positive or negative.\nReview: An awful, bland dinner.",
]


def nf4_adapter_logits(recipe_path, run_dir, ids_list):
    """The trained model computed independently of the merge code: NF4 base + adapter, fp32 matmuls."""
    recipe = load_recipe(recipe_path)
    base = model.load_base(recipe.model, torch.float32, quantized=True)
    model.set_cpu_bf16_fastpath(base, False)
    net = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        return [net(input_ids=ids).logits[0] for ids in ids_list]


OTHERS = ("mistral", "qwen2", "gpt2")


@pytest.mark.parametrize(
    ("arch", "dora"), [("llama", False), ("llama", True), *slow(*((a, d) for d in (False, True) for a in OTHERS))]
)
def test_merged_logits_match_adapter_logits(arch, dora, tiny_model, write_recipe, tmp_path):
    """Plain LoRA and DoRA (its magnitudes folded in as PEFT computes them) on each architecture."""
    recipe_path = write_recipe(tiny_model(arch), lora={"use_dora": dora})
    run = tmp_path / "run"
    assert cli.main(["train", str(recipe_path)]) == 0
    with safe_open(run / "adapter" / "adapter_model.safetensors", "pt") as f:
        lora_b = [f.get_tensor(k) for k in f.keys() if "lora_B" in k]
    assert lora_b and any(torch.count_nonzero(b) for b in lora_b), "training left B at zero: the test would be vacuous"

    assert cli.main(["merge", str(run), "--dtype", "float32"]) == 0
    merged_dir = run / "merged"
    report = json.loads((merged_dir / "merge_report.json").read_text())
    dequantized, original = report["modes"]["dequantized"], report["modes"]["original"]
    assert dequantized["relative_error"] <= 1e-5 and dequantized["top1_agreement"] == 1.0
    assert original["relative_error"] > 10 * dequantized["relative_error"]

    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(merged_dir / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "absmax" in k or "quant" in k]

    tok = model.load_tokenizer(str(merged_dir))
    ids_list = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        for p in PROMPTS
    ]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert type(merged).__name__ == config["architectures"][0]
    with torch.no_grad():
        got = [merged(input_ids=ids).logits[0] for ids in ids_list]
    for want, have in zip(nf4_adapter_logits(recipe_path, run, ids_list), got, strict=True):
        assert ((have - want).norm() / want.norm()).item() <= 1e-5
        assert torch.equal(have.argmax(-1), want.argmax(-1))


def test_merge_after_bf16_training_writes_bf16_that_matches(tiny_model, write_recipe, tmp_path):
    """compute_dtype bf16 loads the base in bf16 before quantizing; the merge must reproduce that, then cast."""
    run = tmp_path / "run"
    assert cli.main(["train", str(write_recipe(tiny_model("llama"), model={"compute_dtype": "bfloat16"}))]) == 0
    assert json.loads((run / "manifest.json").read_text())["quantization"]["load_dtype"] == "bfloat16"
    assert cli.main(["merge", str(run), "--dtype", "float32", "--out", str(tmp_path / "m32")]) == 0
    report = json.loads((tmp_path / "m32" / "merge_report.json").read_text())
    assert report["modes"]["dequantized"]["relative_error"] <= 1e-5
    assert cli.main(["merge", str(run), "--dtype", "bfloat16", "--out", str(tmp_path / "m16")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m16")
    assert merged.dtype == torch.bfloat16
    report = json.loads((tmp_path / "m16" / "merge_report.json").read_text())
    assert report["modes"]["dequantized"]["relative_error"] < report["modes"]["original"]["relative_error"]


SST2 = ROOT / "data" / "seeds" / "sst2"
# Frozen weights stay in bf16 while training computes in bf16: the merge must still equal what was trained, on every
# architecture of the matrix, with tied embeddings, LoRA on the embeddings, and a classifier head trained whole.
BF16_CASES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2, tied embeddings": ("qwen2", {}),
    "gpt2, tied embeddings, conv1d": ("gpt2", {}),
    "llama, LoRA on the embeddings": ("llama", {"lora": {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}}),
    "llama classifier, head trained whole": (
        "llama",
        {
            "task": "seq_cls",
            "data": {
                "train": str(SST2 / "train.jsonl"),
                "eval": str(SST2 / "eval.jsonl"),
                "format": "classification",
                "columns": {"text": "sentence"},
                "max_seq_length": 64,
            },
        },
    ),
}


@pytest.mark.parametrize(
    "case",
    [
        *(c for c in BF16_CASES if BF16_CASES[c][0] == "llama"),
        *slow(*(c for c in BF16_CASES if BF16_CASES[c][0] != "llama")),
    ],
)
def test_merge_of_bf16_frozen_weights_equals_what_was_trained(case, tiny_model, write_recipe, tmp_path):
    arch, sections = BF16_CASES[case]
    recipe = write_recipe(tiny_model(arch), model={"compute_dtype": "bfloat16"}, **sections)
    trainer, _ = build_trainer(load_recipe(recipe))
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad and p.dtype.is_floating_point}
    trained = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    del trainer
    run = tmp_path / "run"
    assert cli.main(["train", str(recipe), "--resume", "never"]) == 0
    assert cli.main(["merge", str(run), "--dtype", "float32"]) == 0
    report = json.loads((run / "merged" / "merge_report.json").read_text())
    assert report["verify"] == "full" and report["modes"]["dequantized"]["relative_error"] <= 1e-5


def test_generate_works_on_run_adapter_merged_and_base(tiny_model, write_recipe, tmp_path):
    run = tmp_path / "run"
    base = tiny_model("llama")
    assert cli.main(["train", str(write_recipe(base))]) == 0
    assert cli.main(["merge", str(run)]) == 0
    outputs = {
        path.name: generate(path, PROMPTS[0], max_new_tokens=6)
        for path in (run, run / "adapter", run / "merged", base)
    }
    assert all(isinstance(text, str) for text in outputs.values())
    # the run (NF4 + adapter) and its merged model are the same model up to NF4 re-quantization in bf16/fp32 math
    assert outputs["run"] == outputs["adapter"]


def test_chat_streams_replies_keeps_history_and_resets(tiny_model, write_recipe, tmp_path):
    """Scripted stdin on a run (NF4 + adapter), its merged model and the base: every streamed reply equals the greedy
    reply to the conversation so far (history kept, /reset clears it), and /exit ends the chat."""
    run, base = tmp_path / "run", tiny_model("llama")
    assert cli.main(["train", str(write_recipe(base))]) == 0
    assert cli.main(["merge", str(run)]) == 0
    first, second, third = (p.replace("\n", " ") for p in (*PROMPTS, "Say something."))  # one line is one turn
    for path in (run, run / "merged", base):
        out = io.StringIO()
        chat(
            path,
            max_new_tokens=6,
            stdin=io.StringIO(f"{first}\n{second}\n/reset\n{third}\n/exit\nignored\n"),
            stdout=out,
        )
        streamed = [
            line.removeprefix("model> ") for line in out.getvalue().split("you> ") if line.startswith("model> ")
        ]
        net, tokenizer, _ = model.load_for_inference(path)
        net.eval()
        a = reply(net, tokenizer, [{"role": "user", "content": first}], 6)
        history = [{"role": "user", "content": first}, {"role": "assistant", "content": a}]
        b = reply(net, tokenizer, [*history, {"role": "user", "content": second}], 6)
        c = reply(net, tokenizer, [{"role": "user", "content": third}], 6)
        assert [text.rstrip("\n") for text in streamed] == [a, b, c], path
        assert "(conversation cleared)" in out.getvalue() and out.getvalue().count("you> ") == 5


def test_manifest_records_what_merge_needs(tiny_model, write_recipe, tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", str(write_recipe(tiny_model("llama")))]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stage"] == "train"
    assert manifest["recipe"]["lora"]["r"] == 8
    assert set(manifest["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes", "trl"}
    assert manifest["base"]["weights_fingerprint"]
    assert manifest["quantization"]["quant_type"] == "nf4" and manifest["quantization"]["double_quant"] is True
    assert len(manifest["data"]["train"]["sha256"]) == 64
    assert manifest["metrics"]["eval_loss_after"] < manifest["metrics"]["eval_loss_before"]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert (run / "adapter" / "adapter_config.json").exists() and (run / "adapter" / "tokenizer_config.json").exists()


def test_merge_refuses_a_base_whose_weights_changed(tiny_model, write_recipe, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model("llama"), base)
    run = tmp_path / "run"
    assert cli.main(["train", str(write_recipe(base))]) == 0
    weights = load_file(base / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="differ from those this adapter was trained on"):
        merge(run)
    assert not (run / "merged").exists()
    assert merge(run, force=True) == run / "merged"
