"""The wire format: what an offloaded image sends, its codecs and exact bytes.

Pure numpy plus the codec libraries (simplejpeg, Pillow, zstandard): the
JAX-free edge and the server both code payloads with it, so nothing here may
import JAX or rcst_jax.
"""
