//! segmenter: streaming, incremental customer segmentation. The engine keeps the batch recipe
//! (user x item matrix → PCA → K-Means → Naive Bayes validation → TF-IDF profiles) exact while
//! rating events stream in; the other modules are thin shells around it.

pub mod bench;
pub mod charts;
pub mod cli;
pub mod config;
pub mod decode;
pub mod demo;
pub mod engine;
pub mod event;
pub mod generator;
pub mod http;
pub mod kafka;
pub mod nullable;
pub mod ownership;
pub mod pipeline;
pub mod replay;
pub mod report;
pub mod service;
pub mod snapshot;
pub mod store;
pub mod telemetry;
