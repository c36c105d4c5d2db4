from esft_jax.cli import main

main()
