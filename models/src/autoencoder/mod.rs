//! The kl-f8 autoencoder: diffusers and LDM layouts, encode/decode, tiled decoding (issue B).
