#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// What identifies a job in its output folder (OUT/job.json): the items with every setting resolved (a digest of
/// them), and the settings that change every image. Re-running against the same folder resumes only when these
/// are equal; the batch size, the shard, the device, the backend and the thread count are not part of it.
public struct JobManifest: Equatable {
    public var itemCount: Int
    /// FNV-1a 64 of the items' canonical JSON: prompts, ids, seeds, sizes, steps, guidance, schedulers, batches, and
    /// img2img items' init image paths and strengths, inpainting items' mask paths and blurs (not the images' contents).
    public var itemsDigest: String
    public var baseSeed: UInt64
    /// model, text_encoder, adapter, clip_skip, variant, precision, format, max_length: as given ("" when absent).
    public var settings: [String: String]

    public init(items: [JobItem], baseSeed: UInt64, settings: [String: String]) {
        itemCount = items.count
        var bytes: [UInt8] = []
        for item in items { JobOutput.itemJSON(item).serialize(into: &bytes); bytes.append(0x0A) }
        itemsDigest = String(FNV1a.hash64(bytes), radix: 16)
        self.baseSeed = baseSeed
        self.settings = settings
    }

    init(itemCount: Int, itemsDigest: String, baseSeed: UInt64, settings: [String: String]) {
        self.itemCount = itemCount
        self.itemsDigest = itemsDigest
        self.baseSeed = baseSeed
        self.settings = settings
    }

    var json: JSONValue {
        .object(["format": .string("pea generate job"), "version": .number(1), "items": .number(Double(itemCount)),
                 "items_digest": .string(itemsDigest), "base_seed": .string(String(baseSeed)),
                 "settings": .object(settings.mapValues { .string($0) })])
    }

    /// The manifest at `path`, nil when there is none.
    public static func read(path: String) throws -> JobManifest? {
        guard isRegularFile(path) else { return nil }
        let value: JSONValue
        do { value = try JSONValue.parse(readWholeFile(path)) } catch let error as JSONParseError {
            throw PEAError.invalidFile(path: path, reason: "not a pea job manifest: \(error)")
        }
        guard let object = value.objectValue, object["format"]?.stringValue == "pea generate job",
              let count = object["items"]?.intValue, let digest = object["items_digest"]?.stringValue,
              let seedText = object["base_seed"]?.stringValue, let seed = UInt64(seedText),
              let settings = object["settings"]?.objectValue else {
            throw PEAError.invalidFile(path: path, reason: "not a pea job manifest (written by `pea generate --prompts … --output-dir`)")
        }
        return JobManifest(itemCount: count, itemsDigest: digest, baseSeed: seed,
                           settings: settings.compactMapValues(\.stringValue))
    }

    /// What differs from `other` (the folder's job), in words; empty when they are the same job.
    public func differences(from other: JobManifest) -> [String] {
        var reasons: [String] = []
        if itemsDigest != other.itemsDigest || itemCount != other.itemCount {
            reasons.append("the prompt file's items or their settings (prompt, seed, size, steps, guidance, scheduler, negative prompt, "
                + "batch, init image, strength) differ: \(other.itemCount) items before, \(itemCount) now")
        }
        for key in Set(settings.keys).union(other.settings.keys).sorted() where settings[key] != other.settings[key] {
            reasons.append("\(key) was '\(other.settings[key] ?? "")', now '\(settings[key] ?? "")'")
        }
        return reasons
    }
}

/// One finished image as results.jsonl records it.
public struct JobResult {
    public var index: Int
    public var image: Int
    /// Where the image is, relative to the output folder: `KEY.png`, or the tar shard that holds `KEY.png`.
    public var file: String
    public var json: [String: JSONValue]
}

/// A job's output folder: the images (PNG files, or webdataset tar shards), OUT/results.jsonl (one line per
/// finished image) and OUT/job.json. Every file appears whole or not at all; what results.jsonl lists, and the
/// files it names hold, is done, and a re-run skips it. With a shard of N > 1 the results file is
/// results-K-of-N.jsonl and the tar shards shard-K-of-N-NNNNNN.tar, so that the shards of one job can share a
/// folder.
public final class JobOutput {
    public enum Format: String, CaseIterable, Sendable { case png, tar }

    public let folder: String
    public let format: Format
    public let shard: JobShard
    /// Images per tar shard (webdataset's usual ~1000).
    public let tarShardSize: Int
    /// The indices of the items whose every image is recorded.
    public private(set) var finishedItems: Set<Int> = []
    /// Images recorded, this run and before.
    public private(set) var imagesRecorded = 0

    public var resultsPath: String { joinPath(folder, shard.count == 1 ? "results.jsonl" : "results-\(shard.index)-of-\(shard.count).jsonl") }
    public var manifestPath: String { joinPath(folder, "job.json") }

    private var results: Int32 = -1
    private var tar: AtomicFileWriter?
    private var tarNumber = 0
    /// Result lines of the tar shard being written, one per image, and their items: they go to results.jsonl
    /// once the shard is in place.
    private var pendingLines: [[UInt8]] = []
    private var pendingItems: Set<Int> = []

    /// Opens (creating) the folder for `manifest`'s job. An existing folder of another job is refused unless
    /// `overwrite`, which starts this shard afresh (removing the files its results list). Otherwise what is
    /// done is read back: results lines that do not parse (a line cut short by a crash), name a missing file,
    /// or belong to an item not all of whose images are recorded are dropped, and the item is made again.
    public init(folder: String, manifest: JobManifest, items: [JobItem], shard: JobShard, format: Format, overwrite: Bool,
                tarShardSize: Int = 1000) throws {
        self.folder = folder
        self.format = format
        self.shard = shard
        self.tarShardSize = max(1, tarShardSize)
        if !isDirectory(folder) {
            guard !isRegularFile(folder) else { throw PEAError.invalidFile(path: folder, reason: "--output-dir is a file, not a folder") }
            try makeDirectories(folder)
        }
        // Only this shard's: the shards of a job may share the folder from several machines.
        let mine = Set(items.filter(shard.contains).flatMap { item in (1...item.batch).map { item.imageKey($0) + ".png" } })
        let resultsName = String(resultsPath.dropFirst(folder.count + 1)), tarPrefix = String(tarName(0).dropLast(10))
        removeStaleTemporaries(in: folder, levels: 1) { name in
            mine.contains(name) || name == resultsName || (name.hasPrefix(tarPrefix) && Self.tarNumber(name) != nil)
                || (shard.count == 1 && name == "job.json")
        }
        let existing = try JobManifest.read(path: manifestPath)
        let differences = existing.map(manifest.differences) ?? []
        if !differences.isEmpty && !overwrite {
            throw PEAError.invalidFile(path: manifestPath, reason: "this folder holds another job: " + differences.joined(separator: "; ")
                + ". Use another --output-dir, or --overwrite to start this one afresh in it")
        }
        if overwrite {
            for record in try readResults(items: items).all { unlink(joinPath(folder, record.file)) }
            unlink(resultsPath)
        }
        if existing != manifest {
            try writeFileAtomically(to: manifestPath) { append in try append(Array((manifest.json.serialized() + "\n").utf8)) }
        }
        try resume(items: items)
    }

    deinit { if results >= 0 { close(results) } }

    private func resume(items: [JobItem]) throws {
        let (kept, all, droppedLines) = try readResults(items: items)
        if droppedLines || kept.count != all.count {
            try writeFileAtomically(to: resultsPath) { append in for record in kept { try append(Self.line(record.json)) } }
        }
        if format == .tar, let last = kept.compactMap({ Self.tarNumber($0.file) }).max() { tarNumber = last + 1 }
        imagesRecorded = kept.count
        finishedItems = Set(kept.map(\.index))
        results = open(resultsPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o666)
        guard results >= 0 else { throw PEAError.invalidFile(path: resultsPath, reason: "cannot open for appending: \(systemErrorMessage())") }
    }

    /// The records of the results file: those that count (every image of the item present, its file there) and
    /// all that parse; `droppedLines` when some line did not parse.
    private func readResults(items: [JobItem]) throws -> (kept: [JobResult], all: [JobResult], droppedLines: Bool) {
        guard isRegularFile(resultsPath) else { return ([], [], false) }
        let bytes = try readWholeFile(resultsPath)
        var all: [JobResult] = [], dropped = false
        for line in bytes.split(separator: 0x0A) where !line.isEmpty {
            guard let object = try? JSONValue.parse(Array(line)).objectValue, let index = object["index"]?.intValue,
                  let image = object["image"]?.intValue, let file = object["file"]?.stringValue, !file.contains("/") else {
                dropped = true
                continue
            }
            all.append(JobResult(index: index, image: image, file: file, json: object))
        }
        let byIndex = Dictionary(items.map { ($0.index, $0) }, uniquingKeysWith: { a, _ in a })
        let present = Set(Set(all.map(\.file)).filter { isRegularFile(joinPath(folder, $0)) })
        let counted = all.filter { byIndex[$0.index] != nil && present.contains($0.file) }
        var images: [Int: Set<Int>] = [:]
        for record in counted { images[record.index, default: []].insert(record.image) }
        let complete = Set(images.compactMap { index, set in set == Set(1...byIndex[index]!.batch) ? index : nil })
        var seen = Set<[Int]>()
        let kept = counted.filter { complete.contains($0.index) && seen.insert([$0.index, $0.image]).inserted }
        return (kept, all, dropped)
    }

    /// Records one item's images: PNG files written at once (each atomically) and their lines appended and
    /// flushed; tar members appended to the shard being written, their lines recorded when it is complete.
    /// `record(image)` is the image's results line (without `file`, which this adds). Returns the path of a tar
    /// shard that this completed.
    @discardableResult
    public func write(_ item: JobItem, images: [RGBImage], parameters: String, record: (Int) -> [String: JSONValue],
                      tarJSON: (Int) -> [String: JSONValue]) throws -> String? {
        var lines: [[UInt8]] = []
        for (offset, image) in images.enumerated() {
            let number = offset + 1, key = item.imageKey(number)
            var json = record(number)
            switch format {
            case .png:
                let name = key + ".png"
                try PNGWriter.write(rgb: image.pixels, width: image.width, height: image.height,
                                    textChunks: [("parameters", parameters)], to: joinPath(folder, name))
                json["file"] = .string(name)
                lines.append(Self.line(json))
            case .tar:
                if tar == nil { tar = try AtomicFileWriter(path: joinPath(folder, tarName(tarNumber))) }
                let png = try PNGWriter.encode(rgb: image.pixels, width: image.width, height: image.height,
                                               textChunks: [("parameters", parameters)], path: tar!.path)
                let modified = Int(time(nil))
                try tar!.append(TarWriter.member(name: key + ".png", data: png, modified: modified))
                try tar!.append(TarWriter.member(name: key + ".json", data: Array((JSONValue.object(tarJSON(number)).serialized() + "\n").utf8),
                                                 modified: modified))
                json["file"] = .string(tarName(tarNumber))
                json["key"] = .string(key)
                pendingLines.append(Self.line(json))
            }
        }
        switch format {
        case .png:
            try appendResults(lines)
            finishedItems.insert(item.index)
            imagesRecorded += images.count
        case .tar:
            pendingItems.insert(item.index)
            if pendingLines.count >= tarShardSize { return try finishTarShard() }
        }
        return nil
    }

    /// Completes the tar shard being written (end blocks, flush, rename into place), records its images and
    /// returns its path (nil when none was being written). Call at the end of the job, and before stopping.
    @discardableResult
    public func finishTarShard() throws -> String? {
        guard let shardFile = tar else { return nil }
        try shardFile.append(TarWriter.endOfArchive)
        try shardFile.commit()
        tar = nil
        try appendResults(pendingLines)
        finishedItems.formUnion(pendingItems)
        imagesRecorded += pendingLines.count
        pendingLines = []
        pendingItems = []
        tarNumber += 1
        return shardFile.path
    }

    private func tarName(_ number: Int) -> String {
        let digits = String(number), padded = String(repeating: "0", count: max(0, 6 - digits.count)) + digits
        return shard.count == 1 ? "shard-\(padded).tar" : "shard-\(shard.index)-of-\(shard.count)-\(padded).tar"
    }

    /// The NNNNNN of a tar shard's name.
    private static func tarNumber(_ file: String) -> Int? {
        guard file.hasSuffix(".tar"), let dash = file.lastIndex(of: "-") else { return nil }
        return Int(file[file.index(after: dash)..<file.index(file.endIndex, offsetBy: -4)])
    }

    private func appendResults(_ lines: [[UInt8]]) throws {
        guard !lines.isEmpty else { return }
        // Whole lines, then a flush: a crash leaves at most a cut-short last line, which resume drops.
        try writeAll(results, Array(lines.joined()), path: resultsPath)
        guard fsync(results) == 0 else { throw PEAError.invalidFile(path: resultsPath, reason: "cannot flush to disk: \(systemErrorMessage())") }
    }

    static func line(_ object: [String: JSONValue]) -> [UInt8] {
        var bytes: [UInt8] = []
        JSONValue.object(object).serialize(into: &bytes)
        bytes.append(0x0A)
        return bytes
    }

    /// An item's settings as canonical JSON (the manifest's digest, and results lines' fields).
    /// `init_image` and `strength` appear only for img2img items, `mask` only for inpainting items and
    /// `mask_blur` only for blurred masks, so older jobs keep their digests.
    public static func itemJSON(_ item: JobItem) -> JSONValue {
        var object: [String: JSONValue] = [
            "index": .number(Double(item.index)), "id": item.id.map(JSONValue.string) ?? .null, "prompt": .string(item.prompt),
            "negative_prompt": item.negativePrompt.map(JSONValue.string) ?? .null, "seed": .number(Double(item.seed)),
            "width": .number(Double(item.width)), "height": .number(Double(item.height)), "steps": .number(Double(item.steps)),
            "guidance": .number(Double(item.guidance)), "scheduler": item.scheduler.map(JSONValue.string) ?? .null,
            "batch": .number(Double(item.batch)), "text": item.text.map(JSONValue.string) ?? .null]
        if let image = item.initImage {
            object["init_image"] = .string(image)
            object["strength"] = .number(item.strength)
        }
        if let mask = item.mask { object["mask"] = .string(mask) }
        if let blur = item.maskBlur { object["mask_blur"] = .number(blur) }
        return .object(object)
    }
}
