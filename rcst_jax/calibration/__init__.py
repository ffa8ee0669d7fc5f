"""Algorithm 1 and the whole-system certificate, and the artifact that carries both."""
