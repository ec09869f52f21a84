//! roost-router: the subscription trie (being written).
#![deny(missing_docs)]
