//! The chained CNI plugin (spec 1.0): parsing, results and errors.
