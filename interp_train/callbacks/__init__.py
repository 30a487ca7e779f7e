"""Lightning callbacks (each also usable from a plain loop through its function)."""

from interp_train.callbacks.neuron_swap import NeuronSwapCallback, check_consecutive, swap_neurons

__all__ = ["NeuronSwapCallback", "check_consecutive", "swap_neurons"]
