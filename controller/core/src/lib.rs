//! Pure core of the Weft controller.
