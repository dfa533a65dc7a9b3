"""Process plumbing that training, evaluation and search share: the device (``device``), data-parallel
process groups and the one rank type (``distributed``), torch threads (``threads``) and the allocator
setting (``allocator``). Imports nothing else of clipforge."""
