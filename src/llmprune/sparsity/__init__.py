"""Pure tensor code: patterns, scores, mask selection and solvers. No modules, hooks or I/O."""
