#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Where training data come from: `pea train --data …`.
public enum TrainingDataSource: Equatable, Sendable {
    /// A JSONL manifest (see `TrainingManifest`).
    case manifest(path: String)
    /// Webdataset-style tar shards, already brace-expanded, in their listed order.
    case shards([String])

    /// Reads `--data` values: one `.jsonl` manifest, or shard patterns (`data/shard-{000000..000009}.tar`,
    /// several separated by `::` or given as several values; see `ShardPattern`).
    /// - Throws: `PEAError.usage` for a mix of a manifest and shards, more than one manifest, nothing at all,
    ///   or a malformed pattern.
    public static func parse(_ specifications: [String]) throws -> TrainingDataSource {
        let patterns = specifications.flatMap(ShardPattern.splitPatterns)
        let manifests = patterns.filter { $0.lowercased().hasSuffix(".jsonl") }
        if !manifests.isEmpty {
            guard manifests.count == 1, patterns.count == 1 else {
                throw PEAError.usage("training data is one .jsonl manifest or tar shard patterns, not \(patterns.joined(separator: ", "))")
            }
            return .manifest(path: manifests[0])
        }
        let shards = try ShardPattern.expand(patterns)
        guard !shards.isEmpty else { throw PEAError.usage("the training data names no manifest and no shards") }
        return .shards(shards)
    }
}

/// Why a record was skipped.
public enum TrainingSkipReason: String, CaseIterable, Sendable, Comparable {
    /// No target-language caption: `text` (or `caption`) missing or empty, and no `.txt` member.
    case missingCaption
    /// A tar sample without a `.jpg`/`.jpeg`/`.png` member.
    case missingImage
    /// A manifest's image file that cannot be opened or read.
    case unreadableImage
    /// An image whose bytes do not decode (corrupt, truncated, not JPEG/PNG, too large).
    case undecodableImage
    /// A tar sample whose `.json` member is not a JSON object.
    case invalidMetadata
    /// A shard that cannot be opened, or that is corrupt from some point on (the samples before that point
    /// are used; one count per such shard and epoch).
    case unreadableShard

    public static func < (a: Self, b: Self) -> Bool {
        allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)!
    }
}

/// Counts of skipped records by reason, since the start of training (restored with the position).
public struct TrainingSkipCounts: Equatable, Sendable, CustomStringConvertible {
    public private(set) var counts: [TrainingSkipReason: Int] = [:]

    public init(_ counts: [TrainingSkipReason: Int] = [:]) { self.counts = counts.filter { $0.value != 0 } }

    public subscript(reason: TrainingSkipReason) -> Int { counts[reason] ?? 0 }
    public var total: Int { counts.values.reduce(0, +) }

    mutating func add(_ reason: TrainingSkipReason) { counts[reason, default: 0] += 1 }

    /// "none", or e.g. "3 missingCaption, 1 undecodableImage" (reasons in declaration order).
    public var description: String {
        let parts = counts.keys.sorted().map { "\(counts[$0]!) \($0.rawValue)" }
        return parts.isEmpty ? "none" : parts.joined(separator: ", ")
    }
}

/// One skipped record, for a log: which, why, and the underlying error's message.
public struct TrainingSkip: Sendable {
    public let reason: TrainingSkipReason
    public let id: String
    public let message: String
}

/// A training example: the image as the official scripts' transform gives it, and the captions.
public struct TrainingSample: Sendable {
    public let id: String
    /// [3, h, w] f32 in [-1, 1] (channels R, G, B), h × w the square or the sample's bucket; nil only when the
    /// dataset's `cachedGeometry` gave the geometry (the caller has the latent cached).
    public let image: HostTensor?
    /// The image's size, crop and tensor size (SDXL's time_ids).
    public let geometry: ImageGeometry
    public let text: String
    public let textEN: String?
    public let languageSpecific: Bool?
}

/// Where a dataset is in its stream, for exact resume: save it with a checkpoint, `restore` it later.
///
/// `index` counts the records (manifest) or tar samples taken from epoch `epoch`'s order so far, skipped ones
/// included. A manifest resumes in O(1): the epoch's permutation is recomputed and iteration continues at
/// `index`. Tar shards have no random access: resuming replays the epoch's deterministic stream (shard order
/// and shuffle buffer from the seed) from its start and discards `index` samples, reading tar headers but
/// decoding no image — so the resumed stream equals the uninterrupted one, at the cost of re-reading the
/// epoch's consumed part of the shards.
public struct TrainingDataPosition: Equatable, Sendable {
    public var epoch: Int
    public var index: Int
    public var skipped: TrainingSkipCounts
    /// Bucketed datasets: the epoch indices (as `index` counts) of the samples waiting in bucket queues for a
    /// batch, in the order they arrived.
    public var pending: [Int]
    /// The seed and the size of the source (records, or shards) the position was taken with; `restore`
    /// refuses a position from another seed or source.
    public var seed: UInt64
    public var sourceSize: Int

    public init(epoch: Int, index: Int, skipped: TrainingSkipCounts, seed: UInt64, sourceSize: Int, pending: [Int] = []) {
        self.epoch = epoch
        self.index = index
        self.skipped = skipped
        self.pending = pending
        self.seed = seed
        self.sourceSize = sourceSize
    }

    /// Compact JSON, e.g. for a checkpoint's safetensors metadata:
    /// `{"epoch":2,"index":17,"seed":"42","skipped":{"missingCaption":3},"source_size":1000}`, with
    /// `"pending":[3,9]` when samples wait in bucket queues.
    public func serialized() -> String {
        var object: [String: JSONValue] = [
            "epoch": .number(Double(epoch)), "index": .number(Double(index)), "seed": .string(String(seed)),
            "source_size": .number(Double(sourceSize)),
            "skipped": .object(Dictionary(uniqueKeysWithValues: skipped.counts.map { ($0.key.rawValue, JSONValue.number(Double($0.value))) })),
        ]
        if !pending.isEmpty { object["pending"] = .array(pending.map { .number(Double($0)) }) }
        return JSONValue.object(object).serialized()
    }

    /// Parses `serialized()`'s text. - Throws: `PEAError.usage` for anything else.
    public init(serialized text: String) throws {
        func fail(_ reason: String) -> PEAError { .usage("invalid training data position \(text): \(reason)") }
        guard let object = (try? JSONValue.parse(text))?.objectValue else { throw fail("not a JSON object") }
        guard let epoch = object["epoch"]?.intValue, epoch >= 0, let index = object["index"]?.intValue, index >= 0,
              let seedText = object["seed"]?.stringValue, let seed = UInt64(seedText),
              let sourceSize = object["source_size"]?.intValue else {
            throw fail("needs epoch, index, seed and source_size")
        }
        var counts: [TrainingSkipReason: Int] = [:]
        for (key, value) in object["skipped"]?.objectValue ?? [:] {
            guard let reason = TrainingSkipReason(rawValue: key), let count = value.intValue else {
                throw fail("unknown skip count '\(key)'")
            }
            counts[reason] = count
        }
        var pending: [Int] = []
        if let list = object["pending"] {
            guard let values = list.arrayValue?.compactMap(\.intValue), values.count == list.arrayValue?.count,
                  values.allSatisfy({ $0 >= 0 && $0 < index }), values == values.sorted(), Set(values).count == values.count else {
                throw fail("'pending' must list increasing sample indices below 'index'")
            }
            pending = values
        }
        self.init(epoch: epoch, index: index, skipped: TrainingSkipCounts(counts), seed: seed, sourceSize: sourceSize, pending: pending)
    }
}

/// The training data stream of `pea train`: an endless, seeded, resumable sequence of samples.
///
/// - Order: a manifest's records are permuted per epoch (Fisher–Yates); tar shards are permuted per epoch
///   and their samples pass through a bounded shuffle buffer (fill to `shuffleBufferSize`, emit a random
///   one, refill). Epoch e uses the generator seeded with `seed + e`, so runs with the same seed see the same
///   stream on every machine. `shuffle: false` keeps file order (manifest lines; shards as listed, samples
///   as stored).
/// - Tar samples are groups of consecutive members with the same key (the path up to the first '.' of its
///   file name, as webdataset's `base_plus_ext`); the extension (lowercased) picks the role: `jpg`/`jpeg`/
///   `png` the image, `json` the caption fields (`text` or `caption`, `text_en`, `language_specific`), `txt`
///   the target-language caption (trimmed) when the JSON has none. A sample's id is `<shard>#<key>`.
/// - Skips: a record without a caption, without an image, with an unreadable or undecodable image, with a
///   broken `.json`, and the rest of a corrupt shard, are skipped and counted (`skipped`), and reported to
///   `onSkip`; they never stop training. An epoch that yields no sample at all throws (the data are unusable,
///   and looping would never end).
/// - Epochs: after the last record, the next epoch starts, reshuffled; `next()` never runs out.
/// - Buckets (`TrainingImageShape.buckets`): `nextBatch(B)` returns B samples of one bucket. Each sample joins
///   its bucket's queue; the first queue to hold B samples is the batch (in arrival order). Queues are emptied
///   when an epoch starts: what an epoch leaves in them is dropped, so a position never refers to another
///   epoch's samples. An epoch that fills no batch is an error (the buckets are too many for the data).
public final class TrainingDataset {
    public let source: TrainingDataSource
    public let shape: TrainingImageShape
    public let seed: UInt64
    public let shuffle: Bool
    public let shuffleBufferSize: Int
    /// The manifest's record count; nil for tar shards (not known without reading them all).
    public var recordCount: Int? { manifest?.records.count }

    /// Called for every skipped record (log the first few, or all).
    public var onSkip: ((TrainingSkip) -> Void)?
    /// When set and it returns a geometry for a record, its image is not decoded: the sample's `image` is nil and
    /// its geometry the one returned (the caller has its latent cached, and the geometry with it). Undecodable
    /// images are then not detected for that record.
    public var cachedGeometry: ((TrainingRecord) -> ImageGeometry?)?

    public private(set) var skipped = TrainingSkipCounts()
    public private(set) var epoch = 0
    /// Records or tar samples taken from this epoch's order (skipped ones included).
    public private(set) var index = 0

    private let manifest: TrainingManifest?
    private let shardPaths: [String]
    private var order: [Int] = []  // manifest: this epoch's permutation
    private var tarEpoch: TarEpochStream?
    private var epochYielded = false
    private var replaying = false
    /// Buckets: each bucket's waiting samples with their epoch indices, and whether this epoch gave a batch.
    private var queues: [[(index: Int, sample: TrainingSample)]] = []
    private var epochBatched = false

    /// Square images of side `resolution`.
    public convenience init(source: TrainingDataSource, resolution: Int, seed: UInt64, shuffle: Bool = true,
                            shuffleBufferSize: Int = 1000) throws {
        try self.init(source: source, shape: .square(resolution), seed: seed, shuffle: shuffle, shuffleBufferSize: shuffleBufferSize)
    }

    /// - Parameters:
    ///   - shape: the square side or the buckets of the image tensors.
    ///   - shuffleBufferSize: samples held by the tar shuffle buffer (webdataset users commonly use 1000).
    /// - Throws: manifest errors (`TrainingManifest`), and `PEAError.usage` for shards that do not exist
    ///   (named), a resolution below 1, or an empty source.
    public init(source: TrainingDataSource, shape: TrainingImageShape, seed: UInt64, shuffle: Bool = true,
                shuffleBufferSize: Int = 1000) throws {
        if case .square(let side) = shape, side < 1 { throw PEAError.usage("the training resolution must be positive, not \(side)") }
        guard shuffleBufferSize > 0 else { throw PEAError.usage("the shuffle buffer size must be positive") }
        self.source = source
        self.shape = shape
        self.seed = seed
        self.shuffle = shuffle
        self.shuffleBufferSize = shuffleBufferSize
        switch source {
        case .manifest(let path):
            manifest = try TrainingManifest(path: path)
            shardPaths = []
        case .shards(let paths):
            guard !paths.isEmpty else { throw PEAError.usage("no tar shards given") }
            let missing = paths.filter { path in
                var status = stat()
                return stat(path, &status) != 0 || (status.st_mode & S_IFMT) != S_IFREG
            }
            guard missing.isEmpty else {
                throw PEAError.usage("\(missing.count) of \(paths.count) shards are not files, first: \(missing[0])")
            }
            manifest = nil
            shardPaths = paths
        }
        startEpoch(0)
    }

    /// The position after the last sample returned.
    public var position: TrainingDataPosition {
        TrainingDataPosition(epoch: epoch, index: index, skipped: skipped, seed: seed, sourceSize: sourceSize,
                             pending: queues.flatMap { $0.map(\.index) }.sorted())
    }

    private var sourceSize: Int { manifest?.records.count ?? shardPaths.count }

    /// Continues from `position` (taken from a dataset of the same source, seed and shuffle settings): the
    /// samples that follow are those the saved dataset would have returned next, and the skip counts go on
    /// from the saved ones.
    /// - Throws: `PEAError.usage` for a position from another seed or source size, or one past the end of its
    ///   epoch.
    public func restore(_ position: TrainingDataPosition) throws {
        guard position.seed == seed else {
            throw PEAError.usage("the saved data position was taken with seed \(position.seed), not \(seed)")
        }
        guard position.sourceSize == sourceSize else {
            throw PEAError.usage("the saved data position was taken from \(position.sourceSize) \(manifest == nil ? "shards" : "records"), this source has \(sourceSize)")
        }
        guard position.pending.isEmpty || isBucketed else {
            throw PEAError.usage("the saved data position has samples waiting in aspect buckets, but this run has no buckets")
        }
        startEpoch(position.epoch)
        let pending = Set(position.pending)
        var waiting: [(index: Int, sample: TrainingSample?)] = []
        if let manifest {
            guard position.index <= manifest.records.count else {
                throw PEAError.usage("the saved data position \(position.index) is past the manifest's \(manifest.records.count) records")
            }
            index = position.index
            replaying = true
            defer { replaying = false }
            waiting = position.pending.map { at in
                let record = manifest.records[order[at]]
                return (at, sample(record: record, image: { try MappedBytes(path: record.id) }))
            }
        } else {
            replaying = true
            defer { replaying = false }
            for consumed in 0..<position.index {
                guard let group = tarEpoch!.nextGroup(report: { _ in }) else {
                    throw PEAError.usage("the saved data position \(position.index) is past the end of epoch \(position.epoch) (\(consumed) samples)")
                }
                if pending.contains(consumed) { waiting.append((consumed, sample(group: group))) }
                index += 1
            }
        }
        for (at, sample) in waiting {
            guard let sample else { throw PEAError.usage("the saved data position's waiting sample \(at) of epoch \(position.epoch) is no longer usable") }
            try enqueue(sample, at: at)
        }
        epochYielded = position.index > 0  // unknown: the earlier part of the epoch may have yielded samples
        epochBatched = position.index > 0
        skipped = position.skipped
    }

    /// The next sample; crosses into the next epoch as needed.
    /// - Throws: `PEAError.invalidFile` when a whole epoch yields no sample.
    public func next() throws -> TrainingSample {
        while true {
            if let sample = try nextInEpoch() {
                epochYielded = true
                return sample
            }
            guard epochYielded else {
                throw PEAError.invalidFile(path: sourceName, reason: "epoch \(epoch) yielded no usable sample (skipped so far: \(skipped))")
            }
            startEpoch(epoch + 1)
        }
    }

    /// `count` samples: the next `count` (possibly spanning an epoch boundary), or with buckets the first
    /// `count` of one bucket (see the type's notes).
    /// - Throws: `PEAError.invalidFile` when a whole epoch yields no sample, or (buckets) fills no batch.
    public func nextBatch(_ count: Int) throws -> [TrainingSample] {
        guard isBucketed else { return try (0..<count).map { _ in try next() } }
        while true {
            guard let sample = try nextInEpoch() else {
                if epochYielded && !epochBatched {
                    let waiting = zip(shape.sizes, queues).filter { !$0.1.isEmpty }.map { "\($0.1.count) at \($0.0.width)x\($0.0.height)" }
                    throw PEAError.invalidFile(path: sourceName, reason: "epoch \(epoch) filled no aspect bucket with a batch of \(count) (samples per bucket: \(waiting.joined(separator: ", "))); lower --batch-size or give fewer buckets")
                }
                guard epochYielded else {
                    throw PEAError.invalidFile(path: sourceName, reason: "epoch \(epoch) yielded no usable sample (skipped so far: \(skipped))")
                }
                startEpoch(epoch + 1)
                continue
            }
            epochYielded = true
            let bucket = try enqueue(sample, at: index - 1)
            if queues[bucket].count == count {
                defer { queues[bucket] = [] }
                epochBatched = true
                return queues[bucket].map(\.sample)
            }
        }
    }

    private var isBucketed: Bool {
        if case .buckets = shape { return true }
        return false
    }

    /// Adds a sample to its bucket's queue; returns the bucket.
    @discardableResult
    private func enqueue(_ sample: TrainingSample, at position: Int) throws -> Int {
        let size = AspectBuckets.Size(width: sample.geometry.width, height: sample.geometry.height)
        guard let bucket = shape.sizes.firstIndex(of: size) else {
            throw PEAError.invalidFile(path: sample.id, reason: "its cached latent is \(size.width)x\(size.height), which is not one of the buckets")
        }
        queues[bucket].append((position, sample))
        return bucket
    }

    private var sourceName: String {
        switch source {
        case .manifest(let path): return path
        case .shards(let paths): return paths.count == 1 ? paths[0] : "\(paths[0]) (and \(paths.count - 1) more shards)"
        }
    }

    // MARK: - Epochs

    /// The generator of epoch `epoch`: seeded with seed + epoch.
    static func generator(seed: UInt64, epoch: Int) -> SplitMix64 { SplitMix64(seed: seed &+ UInt64(epoch)) }

    private func startEpoch(_ newEpoch: Int) {
        epoch = newEpoch
        index = 0
        epochYielded = false
        epochBatched = false
        queues = Array(repeating: [], count: shape.sizes.count)
        var random = Self.generator(seed: seed, epoch: newEpoch)
        if let manifest {
            order = Array(0..<manifest.records.count)
            if shuffle { Self.permute(&order, &random) }
        } else {
            // Two independent streams: the shard permutation, and the shuffle buffer's draws.
            let bufferSeed = random.next()
            var shardOrder = Array(0..<shardPaths.count)
            if shuffle { Self.permute(&shardOrder, &random) }
            tarEpoch = TarEpochStream(shards: shardOrder.map { shardPaths[$0] },
                                      bufferSize: shuffle ? shuffleBufferSize : 1, random: SplitMix64(seed: bufferSeed))
        }
    }

    /// Fisher–Yates from the back, with unbiased draws.
    static func permute(_ values: inout [Int], _ random: inout SplitMix64) {
        guard values.count > 1 else { return }
        for last in stride(from: values.count - 1, to: 0, by: -1) {
            values.swapAt(last, uniform(below: last + 1, &random))
        }
    }

    /// Uniform in 0..<bound (rejection of the biased tail).
    static func uniform(below bound: Int, _ random: inout SplitMix64) -> Int {
        let range = UInt64(bound)
        let threshold = (0 &- range) % range
        while true {
            let value = random.next()
            if value >= threshold { return Int(value % range) }
        }
    }

    private func skip(_ reason: TrainingSkipReason, _ id: String, _ message: String) {
        guard !replaying else { return }
        skipped.add(reason)
        onSkip?(TrainingSkip(reason: reason, id: id, message: message))
    }

    /// The next sample of this epoch, or nil at its end.
    private func nextInEpoch() throws -> TrainingSample? {
        if let manifest {
            while index < order.count {
                let record = manifest.records[order[index]]
                index += 1
                if let sample = sample(record: record, image: { try MappedBytes(path: record.id) }) { return sample }
            }
            return nil
        }
        while let group = tarEpoch!.nextGroup(report: { self.skip($0.reason, $0.id, $0.message) }) {
            index += 1
            if let sample = sample(group: group) { return sample }
        }
        return nil
    }

    private func sample(group: TarGroup) -> TrainingSample? {
        var text: String?, textEN: String?, languageSpecific: Bool?
        if let json = group.members["json"] {
            guard let object = (try? JSONValue.parse(bytes: json.data))?.objectValue else {
                skip(.invalidMetadata, group.id, "\(group.shard): \(json.name) is not a JSON object")
                return nil
            }
            (text, textEN, languageSpecific) = TrainingRecord.captionFields(object)
        }
        if text == nil, let txt = group.members["txt"] {
            let caption = String(decoding: txt.data, as: UTF8.self).trimmingWhitespace()
            if !caption.isEmpty { text = caption }
        }
        let record = TrainingRecord(id: group.id, text: text, textEN: textEN, languageSpecific: languageSpecific)
        guard let image = group.members["jpg"] ?? group.members["jpeg"] ?? group.members["png"] else {
            if text == nil {
                skip(.missingCaption, group.id, "\(group.shard): sample '\(group.key)' has no caption and no image")
            } else {
                skip(.missingImage, group.id, "\(group.shard): sample '\(group.key)' has no .jpg, .jpeg or .png member")
            }
            return nil
        }
        return sample(record: record, image: { image.archive.file }, imageRange: image.offset..<(image.offset + image.size),
                      imageName: "\(group.shard): \(image.name)")
    }

    /// Checks the caption, decodes and transforms the image; nil (counted) when either is missing or bad.
    private func sample(record: TrainingRecord, image: () throws -> MappedBytes, imageRange: Range<Int>? = nil,
                        imageName: String? = nil) -> TrainingSample? {
        guard let text = record.text else {
            skip(.missingCaption, record.id, "\(record.id): no caption (text)")
            return nil
        }
        var tensor: HostTensor?
        var geometry = cachedGeometry?(record)
        if geometry == nil {
            let bytes: MappedBytes
            do {
                bytes = try image()
            } catch {
                skip(.unreadableImage, record.id, "\(error)")
                return nil
            }
            do {
                let (decoded, digest) = try withExtendedLifetime(bytes) { () throws -> (RGBImage, UInt64) in
                    let buffer = imageRange.map { UnsafeRawBufferPointer(rebasing: bytes.buffer[$0]) } ?? bytes.buffer
                    // The file's digest seeds its random bucket crop (AspectBuckets.swift); no other shape needs it.
                    var digest: UInt64 = 0
                    if case .buckets(_, .random) = shape { digest = FNV1a.hash64(buffer) }
                    return (try ImageDecoder.decodeRGB(buffer, name: imageName ?? record.id), digest)
                }
                (tensor, geometry) = TrainingImageTransform.shaped(decoded, to: shape, cropSeed: digest ^ seed)
            } catch {
                skip(.undecodableImage, record.id, "\(error)")
                return nil
            }
        }
        return TrainingSample(id: record.id, image: tensor, geometry: geometry!, text: text, textEN: record.textEN,
                              languageSpecific: record.languageSpecific)
    }
}

// MARK: - Tar streams

/// The members of one tar sample, by lowercased extension (the first of each).
struct TarGroup {
    let shard: String
    let key: String
    var members: [String: TarArchive.Entry]
    var id: String { "\(shard)#\(key)" }
}

/// One epoch's tar samples: shards in the epoch's order, members grouped by key, through the shuffle buffer.
struct TarEpochStream {
    let shards: [String]
    let bufferSize: Int
    var random: SplitMix64
    private var shardIndex = 0
    private var iterator: TarArchive.Iterator?
    private var currentShard = ""
    private var pending: TarGroup?
    private var buffer: [TarGroup] = []

    init(shards: [String], bufferSize: Int, random: SplitMix64) {
        self.shards = shards
        self.bufferSize = bufferSize
        self.random = random
    }

    /// The next sample out of the shuffle buffer, or nil when the epoch's shards are exhausted.
    mutating func nextGroup(report: (TrainingSkip) -> Void) -> TarGroup? {
        while buffer.count < bufferSize, let group = nextInOrder(report: report) { buffer.append(group) }
        guard !buffer.isEmpty else { return nil }
        let chosen = bufferSize == 1 ? 0 : TrainingDataset.uniform(below: buffer.count, &random)
        let group = buffer[chosen]
        buffer[chosen] = buffer[buffer.count - 1]
        buffer.removeLast()
        return group
    }

    /// The next sample in storage order (groups never span shards).
    private mutating func nextInOrder(report: (TrainingSkip) -> Void) -> TarGroup? {
        while true {
            if iterator == nil {
                guard shardIndex < shards.count else { return nil }
                currentShard = shards[shardIndex]
                shardIndex += 1
                do {
                    iterator = try TarArchive(path: currentShard).makeIterator()
                } catch {
                    report(TrainingSkip(reason: .unreadableShard, id: currentShard, message: "\(error)"))
                    continue
                }
            }
            let entry: TarArchive.Entry?
            do {
                entry = try iterator!.next()
            } catch {
                report(TrainingSkip(reason: .unreadableShard, id: currentShard, message: "\(error)"))
                entry = nil
            }
            guard let entry else {
                iterator = nil
                if let group = pending {
                    pending = nil
                    return group
                }
                continue
            }
            guard entry.kind == .file, let (key, ext) = Self.keyAndExtension(entry.name) else { continue }
            if pending?.key == key {
                if pending!.members[ext] == nil { pending!.members[ext] = entry }
                continue
            }
            let finished = pending
            pending = TarGroup(shard: currentShard, key: key, members: [ext: entry])
            if let finished { return finished }
        }
    }

    /// webdataset's `base_plus_ext`: the key is the path up to the first '.' of the file name, the extension
    /// the rest (lowercased); names without a '.' in the file name (or starting with one) have none.
    static func keyAndExtension(_ name: String) -> (String, String)? {
        let fileStart = name.lastIndex(of: "/").map { name.index(after: $0) } ?? name.startIndex
        guard let dot = name[fileStart...].firstIndex(of: "."), dot > fileStart else { return nil }
        let ext = name[name.index(after: dot)...]
        return (String(name[..<dot]), ext.lowercased())
    }
}
