//! weir controller
