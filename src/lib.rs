//! segmenter: streaming, incremental customer segmentation. The engine keeps the batch recipe
//! (user x item matrix → PCA → K-Means → Naive Bayes validation → TF-IDF profiles) exact while
//! rating events stream in; the other modules are thin shells around it.

pub mod decode;
pub mod engine;
pub mod event;
pub mod generator;
pub mod snapshot;
pub mod config;
pub mod store;
pub mod bench;
pub mod cli;
pub mod demo;
pub mod replay;
