"""The public API, floor 5: argument checks, pattern -> layout, dispatch to the kernels."""
