"""Target topologies for `lima_jax.plan`: how many JAX devices a slice has, each one's HBM, HBM
bandwidth and bf16 peak, and the hosts (JAX processes) that drive them.

Cloud TPU names count differently per generation: v4-N and v5p-N count TensorCores (two per chip;
JAX sees one device per chip), v5e-N (`v5litepod-N`) and v6e-N count chips. `cpu:N` is N fake CPU
devices sharing this host's memory.
"""

import dataclasses
import os

from lima_jax.errors import LimaError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int  # what the TPU runtime reports as the device's memory limit
  peak_flops: float  # dense bf16 FLOP/s per chip
  cores_per_chip: int  # how many of the accelerator type's count one chip is
  sizes: tuple  # the counts Cloud TPU offers (any multiple of the step past the listed ones)
  step: int
  hbm_bandwidth: float  # bytes/s per chip
  chips_per_host: int  # chips per TPU VM (one JAX process) in a multi-host slice
  host_memory: int  # bytes of RAM per such VM
  single_host_chips: int = 0  # a slice of up to this many chips runs on one VM of them all
  single_host_memory: int = 0  # that VM's RAM


# Peak, HBM and its bandwidth, chips and RAM per VM: the Cloud TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e) and their machine types (ct4p-hightpu-4t,
# ct5lp-hightpu-4t/8t, ct5p-hightpu-4t, ct6e-standard-4t/8t).
GB = 10**9


CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 2, (8,), 8, 1228 * GB, 4, 407 * GB),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 1, (1, 4, 8, 16, 32, 64, 128, 256), 0, 819 * GB, 4,
                192 * GB, 8, 384 * GB),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2, (8,), 8, 2765 * GB, 4, 448 * GB),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1, (1, 4, 8, 16, 32, 64, 128, 256), 0, 1640 * GB, 4,
                720 * GB, 8, 1440 * GB),
}
_ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  devices: int  # JAX devices: chips on a TPU
  hbm_bytes: int  # per device
  peak_flops: float | None  # per device; None where we know no meaningful peak (CPU)
  chip: str
  hosts: int = 1  # TPU VMs, one JAX process each
  hbm_bandwidth: float | None = None  # bytes/s per device; None for a CPU
  host_memory: int = 0  # bytes of RAM per host


def parse(name: str) -> Topology:
  """'v5p-32', 'v4-128', 'v5e-16', 'v5litepod-16', 'v6e-8' or 'cpu:8'."""
  if name.startswith("cpu:"):
    count = _count(name, name[4:])
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Topology(name, count, host // count, None, "CPU (fake devices share host memory)",
                    host_memory=host)
  generation, _, size = name.partition("-")
  generation = _ALIASES.get(generation, generation)
  if generation not in CHIPS or not size:
    raise LimaError(f"--topology: {name!r} is not one of v4-N, v5e-N (v5litepod-N), v5p-N, "
                    "v6e-N or cpu:N")
  chip = CHIPS[generation]
  count = _count(name, size)
  if count not in chip.sizes and not (chip.step and count % chip.step == 0):
    offered = (f"a multiple of {chip.step}" if chip.step
               else ", ".join(str(s) for s in chip.sizes))
    raise LimaError(f"--topology: {name}: {generation} slices come in sizes {offered}")
  chips = count // chip.cores_per_chip
  one_vm = chips <= max(chip.single_host_chips, chip.chips_per_host)
  memory = chip.single_host_memory if one_vm and chips > chip.chips_per_host else chip.host_memory
  return Topology(f"{generation}-{count}", chips, chip.hbm_bytes, chip.peak_flops, chip.name,
                  hosts=1 if one_vm else -(-chips // chip.chips_per_host),
                  hbm_bandwidth=chip.hbm_bandwidth, host_memory=memory)


def slice_for(topology: Topology, devices: int) -> str | None:
  """The smallest slice of the same generation with at least `devices` chips (powers of two)."""
  generation = topology.name.split("-")[0]
  chip = CHIPS.get(generation)
  if chip is None:
    return None
  if not chip.step:
    fitting = [s for s in chip.sizes if s // chip.cores_per_chip >= devices]
    return f"{generation}-{fitting[0]}" if fitting else None  # None: more than a whole pod
  count = chip.sizes[0]
  while count // chip.cores_per_chip < devices:
    count *= 2
  return f"{generation}-{count}"


def _count(name: str, text: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise LimaError(f"--topology: {name}: the size must be a positive integer")
  return int(text)
