"""Python wrappers of the torch.ops.r1x custom ops: one module per op family, each holding the
wrapper, its fake (meta) implementation for torch.compile, and autograd where it applies."""
