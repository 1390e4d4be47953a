"""The clocks: the kernel's view of the wall clock (`kernel`) and the agent's watch (`watch`)."""

from edge_agent.clock.kernel import KernelClock, boot_id, read_kernel_clock
from edge_agent.clock.watch import ClockWatch, Step

__all__ = ["ClockWatch", "KernelClock", "Step", "boot_id", "read_kernel_clock"]
