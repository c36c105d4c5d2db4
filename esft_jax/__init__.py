"""esft-jax: Expert-Specialized Fine-Tuning of Mixture-of-Experts LLMs in JAX/Flax."""

__version__ = "0.1.0"
