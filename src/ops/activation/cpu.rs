//! CPU activations. (To be written.)
