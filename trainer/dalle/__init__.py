"""Text-to-image (DALL-E, ../shared/specs/dalle.md): the discrete VAE that turns images into a grid of codes, and the
pieces of the transformer prior over [caption tokens ; image tokens] that are shared by its families and jobs."""
