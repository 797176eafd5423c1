"""KV cache: clustered document keys and squeezed attention over them. Imports only torch (+ safetensors).

clustering   ClusterConfig, ClusteredLayer, CoarseLevel, cluster_layer, layer_from_assignments,
             kmeans, ranges_to_indices                      cluster-ordered document KV per layer
selection    ThresholdRule, TopBudgetRule, SelectionRule, select_clusters, cluster_log_weights,
             hierarchical_log_weights, top_budget, padded_ranges   which clusters a query reads
calibration  Thresholds, calibrate_thresholds, selected_fraction, weighted_quantiles
                                                             thresholds for named KV budgets
squeezed     squeezed_attention, dense_attention, SqueezeStats     attention over selected clusters + tail
store        CacheKey, ClusteredCache, save_cache, load_cache, CacheError, CacheMismatchError,
             CacheCorruptError                               safetensors persistence, mmap on load
"""
