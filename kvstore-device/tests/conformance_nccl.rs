//! The conformance suite run against the `nccl` store. Without a GPU and `libnccl` the
//! factory fails with `Error::Device` and every check is reported ignored with the reason.
use kvstore_device as _; // links the crate, whose registration provides `nccl`

kvstore_test::conformance_tests!(|| kvstore_base::create("nccl"));
