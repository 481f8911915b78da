//! Storage server: io_uring O_DIRECT engine, on-disk format, epoch comparator (arrives with issue 3).
