//! CNI plugin and agent protocol
