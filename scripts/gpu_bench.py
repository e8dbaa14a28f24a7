"""`loramix bench` on a GPU with a randomly initialised model of Llama-2-7b's shape (no weights travel).

Two steps, because the GPU machine has no hub and no registry:

    python scripts/gpu_bench.py prepare --assets .gpu        # here: tokenizer, embedder config, prompts (~3 MB)
    python scripts/gpu_bench.py run --assets .gpu --out OUT  # on the GPU machine (PYTHONPATH=src)
    python scripts/gpu_bench.py bundle --assets .gpu --out B # there too: the same random model as a bundle on disk,
                                                             # for `loramix serve --bundle B` (scripts/gpu_check.sh)

`prepare` trains a 32,000-token byte-level BPE tokenizer on the tasks' training texts (Llama-2's vocabulary
size; Llama-2's own tokenizer is not available offline), copies all-MiniLM-L6-v2's configuration and
tokenizer without its weights, and stores 16 test prompts per task. `run` builds on the GPU, in bf16:
the base model (Llama-2-7b shape: 32 layers, d=4096, MLP 11008, 32 heads, vocab 32000), four random r=64
LoRA experts on q_proj and v_proj saved as PEFT adapter folders, a random MiniLM-shaped embedder and random
centroids, and then runs the same benchmark as `loramix bench` (Arrow left out), writing bench.json and
bench.md into OUT. Random weights give meaningless text but the same arithmetic and memory traffic as the
real model, so milliseconds per token are faithful; `--tiny` runs the whole path on a small model on CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import torch

LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}
TINY = {**LLAMA2_7B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY["num_key_value_heads"] = 4
EXPERTS = ("gsm8k", "arc", "squad", "codealpaca")
EMBEDDER_WEIGHTS = {"model.safetensors", "pytorch_model.bin"}


def prepare(assets: Path, data: str | None) -> None:
    from loramix.bench.synthetic import byte_level_tokenizer
    from loramix.models import resolve_embedder
    from loramix.paths import data_dir
    from loramix.tasks import TASKS

    root = data_dir(data)
    assets.mkdir(parents=True, exist_ok=True)
    texts = [e.training_text for spec in TASKS.values() for e in spec.load(root, "train")]
    tokenizer = byte_level_tokenizer(
        texts, LLAMA2_7B["vocab_size"], ["<unk>", "<s>", "</s>"],  # Llama-2's ids 0, 1, 2
        unk_token="<unk>", bos_token="<s>", eos_token="</s>",
    )  # fmt: skip
    tokenizer.save_pretrained(assets / "tokenizer")
    embedder = Path(resolve_embedder("minilm"))
    target = assets / "minilm"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(embedder, target, ignore=lambda folder, names: [n for n in names if n in EMBEDDER_WEIGHTS])
    prompts = {task: [e.prompt for e in spec.load(root, "test")[:16]] for task, spec in TASKS.items()}
    (assets / "prompts.json").write_text(json.dumps(prompts), encoding="utf-8")
    print(f"tokenizer: {len(tokenizer)} tokens; assets in {assets}")


def _random_embedder(assets: Path, folder: Path, device: str) -> Path:
    """MiniLM's configuration and tokenizer with random weights (the shape is what costs time)."""
    from transformers import AutoConfig, AutoModel

    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(assets / "minilm", folder)
    model = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    model.save_pretrained(folder)
    return folder


def _random_model(args: argparse.Namespace):
    """The random Llama of the chosen shape (Llama-2-7b's, or a tiny one for a CPU dry run) on the GPU in bf16 by
    default, its tokenizer, and where and how it is placed: (model, tokenizer, shape, device, dtype)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    torch.manual_seed(0)
    shape = TINY if args.tiny else LLAMA2_7B
    with torch.device(device):
        model = LlamaForCausalLM._from_config(
            LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0), dtype=dtype
        ).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 0
    tokenizer = AutoTokenizer.from_pretrained(args.assets / "tokenizer")
    tokenizer.pad_token = tokenizer.unk_token
    return model, tokenizer, shape, device, dtype


def _randomise_lora_B(peft: torch.nn.Module, generator: torch.Generator) -> None:
    """PEFT starts B at zero, trained experts do not: small random B for every adapter the model holds."""
    for name, parameter in peft.named_parameters():
        if "lora_B" in name:
            parameter.data.copy_((torch.randn(parameter.shape, generator=generator) * 0.02).to(parameter))


def _experts(peft_base: torch.nn.Module, folder: Path, rank: int):
    """Four random r=`rank` q/v experts, saved as PEFT adapter folders; returns the PeftModel holding them all."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    peft = get_peft_model(peft_base, config, adapter_name=EXPERTS[0])
    for name in EXPERTS[1:]:
        peft.add_adapter(name, config)
    _randomise_lora_B(peft, torch.Generator(device="cpu").manual_seed(0))
    paths = []
    for name in EXPERTS:
        peft.save_pretrained(folder, selected_adapters=[name])
        paths.append(str(folder / name) if (folder / name).is_dir() else str(folder))
    peft.set_adapter(EXPERTS[0])
    return peft.eval(), paths


def write_bundle(args: argparse.Namespace) -> None:
    """The random model as a loramix bundle folder: base model (+ tokenizer), four experts, a random embedder, random
    text and hidden-state centroids. Loads like any bundle (`loramix serve --bundle`), to serve and load-test it."""
    from peft import LoraConfig, get_peft_model

    from loramix.bundle import Bundle, ExpertEntry
    from loramix.centroids import save_centroids
    from loramix.hidden_router import HIDDEN_ROUTER_FILE

    start = time.perf_counter()
    root = Path(args.out)
    if root.exists():
        shutil.rmtree(root)
    model, tokenizer, shape, device, dtype = _random_model(args)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    config = LoraConfig(r=args.rank, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    generator = torch.Generator(device="cpu").manual_seed(0)
    entries = []
    for name in EXPERTS:  # one at a time on the same model: a PEFT wrapper, random B, save, unwrap
        peft = get_peft_model(model, config)
        _randomise_lora_B(peft, generator)
        peft.save_pretrained(root / "experts" / name)
        model = peft.unload()
        entries.append(ExpertEntry(name=name, path=f"experts/{name}"))
    embedder = _random_embedder(args.assets, root / "minilm", device)
    dim = json.loads((embedder / "config.json").read_text(encoding="utf-8"))["hidden_size"]
    names = list(EXPERTS)
    save_centroids(root / "router.safetensors", torch.randn(len(names), dim, generator=generator), names)
    hidden = torch.randn(shape["num_hidden_layers"] + 1, len(names), shape["hidden_size"], generator=generator)
    save_centroids(root / HIDDEN_ROUTER_FILE, hidden, names)
    about = {"random": f"{'tiny' if args.tiny else 'Llama-2-7b'} shape, r={args.rank}, {dtype}"}
    base = str((root / "base").resolve())
    Bundle(root=root, base_model=base, embedder=str(embedder.resolve()), experts=entries, info=about).save()
    print(f"bundle written to {root} in {time.perf_counter() - start:.0f} s", flush=True)


def run(args: argparse.Namespace) -> None:
    from loramix.adapters import load_expert
    from loramix.bench import BenchContext, run_benchmark, write_report_files
    from loramix.generation import MixtureModel
    from loramix.hidden_router import HiddenRouter
    from loramix.router import CentroidRouter, Embedder

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, tokenizer, shape, device, dtype = _random_model(args)
    base, peft_base = copy.deepcopy(model), copy.deepcopy(model)
    peft, paths = _experts(peft_base, work / "experts", args.rank)
    experts = [load_expert(path, name, dtype=dtype) for name, path in zip(EXPERTS, paths)]
    embedder = Embedder(str(_random_embedder(args.assets, work / "minilm", device)), device, "auto")
    centroids = torch.nn.functional.normalize(torch.randn(len(EXPERTS), embedder.dim), dim=-1)
    mixture = MixtureModel(model, tokenizer, experts, CentroidRouter(embedder, centroids))
    hidden = torch.randn(shape["num_hidden_layers"] + 1, len(EXPERTS), shape["hidden_size"])
    mixture.hidden_router = HiddenRouter(hidden)  # random centroids: the default route's cost, not its choices
    prompts = json.loads((args.assets / "prompts.json").read_text(encoding="utf-8"))
    shape_name = "tiny Llama (CPU dry run)" if args.tiny else "Llama-2-7b shape"
    description = {
        "bundle": f"random weights, {shape_name}, {dtype} on {device}; 4 random r={args.rank} q/v experts",
        "base_model": f"LlamaForCausalLM({', '.join(f'{k}={v}' for k, v in shape.items())})",
    }
    ctx = BenchContext(mixture, base, peft, paths, prompts, description)
    print(f"built in {time.perf_counter() - start:.0f} s on {device}", flush=True)
    report = run_benchmark(
        args.out,
        tokens=tuple(args.tokens),
        batches=tuple(args.batches),
        repeats=args.repeats,
        with_merge_grid=args.merge_grid,
        context=ctx,
        exclude=("arrow",),
        progress=lambda line: print(line, flush=True),
    )
    if device == "cuda":
        report["meta"]["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    command = "python scripts/gpu_bench.py run " + " ".join(args.command_line)
    write_report_files(report, args.out, command, "ms_per_token_gpu.png")
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="write the assets the GPU machine needs (run here)")
    prep.add_argument("--assets", type=Path, default=Path(".gpu"))
    prep.add_argument("--data-dir", default=None)
    bench = commands.add_parser("run", help="build the random model and benchmark it")
    bench.add_argument("--assets", type=Path, default=Path(".gpu"))
    bench.add_argument("--out", type=Path, required=True)
    bench.add_argument("--work", default="/tmp/loramix-gpu-bench", help="scratch folder for adapters and embedder")
    bench.add_argument("--tokens", type=int, nargs="+", default=[32, 128, 256])
    bench.add_argument("--batches", type=int, nargs="*", default=[1, 8, 16], help="none: only the merge grid")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--rank", type=int, default=64)
    bench.add_argument("--merge-grid", action="store_true", help="also every decode x k x merge mode at batch 1")
    bench.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    bench.add_argument("--tiny", action="store_true", help="a small model on CPU, to check the script")
    bundle = commands.add_parser("bundle", help="the random model as a bundle folder, for `loramix serve`")
    bundle.add_argument("--assets", type=Path, default=Path(".gpu"))
    bundle.add_argument("--out", type=Path, required=True)
    bundle.add_argument("--rank", type=int, default=64)
    bundle.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    bundle.add_argument("--tiny", action="store_true", help="a small model, to check the script")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.assets, args.data_dir)
    elif args.command == "bundle":
        write_bundle(args)
    else:
        args.command_line = sys.argv[2:]
        run(args)


if __name__ == "__main__":
    main()
