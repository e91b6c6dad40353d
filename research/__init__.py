"""An autograd-verified research testbed: a numpy MLP with handwritten backprop."""
