"""What one benchmark run measures and how hard: three presets (tiny, quick, full) of one dataclass.

Everything that changes a number is here, so the JSON can record it and two runs with the same
settings measure the same thing. `tiny` exists for the test suite (seconds, not figures anyone
should quote); `quick` finishes in a few minutes on 2 cores; `full` is what the README quotes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

SECTIONS = ("training_cost", "inference", "accuracy", "sizes")
DEVICES = ("cpu", "cuda")
PEERS = ("nncf", "brevitas")  # optional QAT tools (the `bench` extra); "unavailable: why" without them


LR_SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class FloatRecipe:
    """How the float MobileNetV2 is trained from scratch on Fashion-MNIST (the cached checkpoint).

    Converged, as QAT recipes assume (DESIGN.md section 2: MNN's starts from a converged float
    model): 6000 steps (3.2 epochs) with the lr annealed to 0 by a cosine reach 87.8%, where 100
    QAT steps at lr 1e-4 gain nothing as float training. The earlier 1500 steps at a constant lr
    (84.9%) left QAT mostly measuring further training: every QAT tool ended 0.7-1.2 pt above float,
    ranked by how fast it trained on (Brevitas's BatchNorm folded into the convolutions first).
    """

    model: str = "mobilenet_v2"
    image_size: int = 32
    batch_size: int = 32
    steps: int = 6000
    lr: float = 0.02  # the start of the schedule
    lr_schedule: str = "cosine"  # or "constant"
    momentum: float = 0.9
    weight_decay: float = 4e-5
    train_images: int = 60000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is not accepted: use one of {', '.join(LR_SCHEDULES)}")


@dataclass(frozen=True)
class QatRecipe:
    """The one QAT recipe both QAT tools get (MNN's: SGD, momentum 0.9, wd 4e-5, batch 32)."""

    batch_size: int = 32
    steps: int = 100
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 4e-5
    calibration_batches: int = 10  # PTQ calibration, also the QAT tools' starting ranges
    # One QAT run per seed (batch order); accuracy is their mean. The first seed also draws the
    # calibration images, the same for every run. Five: from the converged float model the tools
    # end within 0.2 pt of each other, about one seed's spread (0.1-0.3 pt).
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)

    @property
    def seed(self) -> int:
        return self.seeds[0]


@dataclass(frozen=True)
class BenchSettings:
    mode: str = "full"
    sections: tuple[str, ...] = SECTIONS
    threads: int = 2
    device: str = "cpu"  # where the models train (training cost, QAT); the runtimes run on the CPU
    peers: tuple[str, ...] = PEERS  # the optional QAT tools compared next to ours and torch.ao
    # 1. training cost: (image size, batch) pairs; alternating rounds of one step per contender
    train_shapes: tuple[tuple[int, int], ...] = ((224, 8), (32, 32))
    train_rounds: int = 9
    train_warmup: int = 2
    # peak memory of one step, each contender in a fresh subprocess (CPU: RSS; CUDA: allocator)
    memory: bool = True
    memory_contenders: tuple[str, ...] | None = None  # None: every contender of the section
    memory_steps: int = 2  # steps measured after `train_warmup` ones; the largest peak counts
    profile: bool = False  # add torch.profiler op times of float vs our QAT step per shape
    profile_rounds: int = 4
    # 2. inference: image sizes and batch sizes; rounds of >= min_sample_s per contender
    infer_sizes: tuple[int, ...] = (224, 32)
    infer_batches: tuple[int, ...] = (1, 64)
    infer_rounds: int = 11
    infer_warmup: int = 3
    min_sample_s: float = 0.05
    calibration_images: int = 64  # images for onnxruntime's and our PTQ at each inference size
    openvino: bool = True
    # 3. accuracy
    float_recipe: FloatRecipe = field(default_factory=FloatRecipe)
    qat_recipe: QatRecipe = field(default_factory=QatRecipe)
    our_bits: tuple[int, ...] = (8, 4)
    test_images: int = 10000
    eval_batch_size: int = 256
    # 4. sizes
    size_bits: tuple[int, ...] = (8, 6, 4, 2)

    def to_dict(self) -> dict:
        return asdict(self)


FULL = BenchSettings()

QUICK = replace(
    FULL, mode="quick", train_rounds=5, train_warmup=1, infer_rounds=7, infer_warmup=2,
    min_sample_s=0.03, calibration_images=32,
    float_recipe=replace(FloatRecipe(), steps=300, train_images=20000),
    qat_recipe=replace(QatRecipe(), steps=40, calibration_batches=4, seeds=(1,)),
    test_images=2000)

# For the test suite: every section and code path, tiny shapes, no meaningful numbers. One thread:
# the suite runs two workers on 2 cores, and two OpenMP threads per process on a busy core spin
# (a 32x32 batch-4 float step measured 9-15 s with 2 threads next to other work, 0.1 s with 1).
TINY = replace(
    FULL, mode="tiny", threads=1, train_shapes=((32, 4),), train_rounds=2, train_warmup=1,
    memory_contenders=("float", "ours_qat"), memory_steps=1,
    profile=True, profile_rounds=1,
    infer_sizes=(32,), infer_batches=(1, 4), infer_rounds=2, infer_warmup=1, min_sample_s=0.0,
    calibration_images=8,
    float_recipe=replace(FloatRecipe(), steps=1, batch_size=8, train_images=256),
    qat_recipe=replace(QatRecipe(), steps=1, batch_size=8, calibration_batches=1, seeds=(1, 2)),
    our_bits=(8,), test_images=64, eval_batch_size=64, size_bits=(8,))  # INT4 packing: tests/artifact

PRESETS = {"full": FULL, "quick": QUICK, "tiny": TINY}


def preset(mode: str, **overrides) -> BenchSettings:
    """A preset by name, with fields replaced (e.g. sections=("sizes",), openvino=False)."""
    if mode not in PRESETS:
        raise ValueError(f"mode={mode!r} is not accepted: use one of {', '.join(PRESETS)}")
    bad = [s for s in overrides.get("sections", ()) if s not in SECTIONS]
    if bad:
        raise ValueError(f"sections {bad} are not accepted: use any of {', '.join(SECTIONS)}")
    if overrides.get("device", "cpu") not in DEVICES:
        raise ValueError(f"device={overrides['device']!r} is not accepted: use one of {', '.join(DEVICES)}")
    bad = [p for p in overrides.get("peers", ()) if p not in PEERS]
    if bad:
        raise ValueError(f"peers {bad} are not accepted: use any of {', '.join(PEERS)}")
    return replace(PRESETS[mode], **overrides)
