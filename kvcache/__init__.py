"""KV cache: clustered document keys and squeezed attention over them. Imports torch, safetensors and
scikit-learn (its k-means is the "sklearn" clustering backend).

clustering   ClusterConfig, ClusteredLayer, CoarseLevel, cluster_layer, layer_from_assignments,
             kmeans, cluster_shares, ranges_to_indices      cluster-ordered document KV per layer
selection    ThresholdRule, TopBudgetRule, SelectionRule, select_clusters, cluster_log_weights,
             hierarchical_log_weights, top_budget, padded_ranges   which clusters a query reads
calibration  Thresholds, calibrate_thresholds, selected_fraction, weighted_quantiles
                                                             thresholds for named KV budgets
gqa          grouped_sdpa, fold_queries, fold_mask           SDPA with a KV head's query heads as its rows
squeezed     squeezed_attention, full_document_attention, dense_attention, SqueezeStats
                                                             attention over selected clusters (or all) + tail
store        CacheKey, ClusteredCache, save_cache, load_cache, CacheError, CacheMismatchError,
             CacheCorruptError, PrefillCheckpoints           safetensors persistence, mmap on load,
                                                             resumable prefill slices
"""
