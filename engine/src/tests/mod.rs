//! The engine as its clients meet it, served by the in-process [`util::Harness`] (its
//! top comment says how to write a test). One file per topic.

mod util;

mod closing;
mod fuzz;
mod keep_alive;
mod lifecycle;
mod limits;
mod qos;
mod queues;
mod restart;
mod retained;
mod seam;
mod shared;
mod store_full;
mod takeover;
