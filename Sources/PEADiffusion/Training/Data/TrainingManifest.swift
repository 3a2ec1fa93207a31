/// One training record: an image and its captions. Records come from a JSONL manifest line or a tar
/// shard's sample.
public struct TrainingRecord: Equatable, Sendable {
    /// A stable identity: the resolved image path for manifests, `<shard path>#<key>` for tar samples. It keys
    /// the latent cache and names the record in logs.
    public let id: String
    /// The caption in the target language (the student's input); nil when the record has none (such a
    /// record is skipped and counted as `missingCaption`).
    public let text: String?
    /// The English caption (the teacher's input), when given.
    public let textEN: String?
    /// PEA's `zh_or_not` flag for hybrid training (true: the caption is language-specific, the task loss
    /// applies), when given.
    public let languageSpecific: Bool?

    public init(id: String, text: String?, textEN: String?, languageSpecific: Bool?) {
        self.id = id
        self.text = text
        self.textEN = textEN
        self.languageSpecific = languageSpecific
    }

    /// The caption fields of a JSON object, shared by manifests and tar samples' `.json` members: `text`
    /// (or its alias `caption`), `text_en`, `language_specific` (a boolean, or a number: nonzero is true).
    /// Fields of another type count as absent; an empty `text` is a missing caption.
    static func captionFields(_ object: [String: JSONValue]) -> (text: String?, textEN: String?, languageSpecific: Bool?) {
        let text = (object["text"]?.stringValue ?? object["caption"]?.stringValue).flatMap { $0.isEmpty ? nil : $0 }
        let textEN = object["text_en"]?.stringValue
        var languageSpecific: Bool?
        switch object["language_specific"] {
        case .bool(let value)?: languageSpecific = value
        case .number(let value)?: languageSpecific = value != 0
        default: languageSpecific = nil
        }
        return (text, textEN, languageSpecific)
    }
}

/// A JSONL training manifest: one JSON object per line,
///
///     {"image": "images/0001.jpg", "text": "一只熊猫", "text_en": "a panda", "language_specific": true}
///
/// `image` is a path relative to the manifest's folder (or absolute). Blank lines are ignored; a UTF-8 byte
/// order mark at the start and CR before LF are tolerated.
///
/// Error policy (chosen so a broken manifest fails at once, while bad data is skipped during training):
/// - a line that is not valid JSON, not an object, or has no `image` string is an error, thrown when the
///   manifest is loaded, naming the file and the line (`PEAError.invalidFile`, reason "line N: …");
/// - a record without a caption (`text` missing, empty or not a string) is kept here with `text == nil` and
///   skipped by `TrainingDataset`, which counts it as `missingCaption`; a missing or undecodable image file is
///   likewise a counted skip at iteration time, never a load error.
public struct TrainingManifest: Sendable {
    public let path: String
    /// The records in file order; record `i`'s `id` is its image path joined to the manifest's folder.
    public let records: [TrainingRecord]
    /// The 1-based line of each record, for messages.
    public let lines: [Int]

    public init(path: String) throws {
        self.path = path
        let bytes = try readWholeFile(path)
        let folder = TrainingManifest.folder(of: path)
        var records: [TrainingRecord] = [], lines: [Int] = []
        var lineNumber = 0, start = 0
        if bytes.count >= 3, bytes[0] == 0xEF, bytes[1] == 0xBB, bytes[2] == 0xBF { start = 3 }
        while start < bytes.count {
            lineNumber += 1
            var end = start
            while end < bytes.count && bytes[end] != 0x0A { end += 1 }
            var lineEnd = end
            if lineEnd > start && bytes[lineEnd - 1] == 0x0D { lineEnd -= 1 }
            let line = bytes[start..<lineEnd]
            start = end + 1
            if line.allSatisfy({ $0 == 0x20 || $0 == 0x09 }) { continue }
            func fail(_ reason: String) -> PEAError { .invalidFile(path: path, reason: "line \(lineNumber): \(reason)") }
            let value: JSONValue
            do {
                value = try line.withUnsafeBytes { try JSONValue.parse(bytes: $0) }
            } catch let error as JSONParseError {
                throw fail("invalid JSON: \(error.message) at column \(error.column)")
            }
            guard let object = value.objectValue else { throw fail("expected a JSON object, found \(value.kindDescription)") }
            guard let image = object["image"]?.stringValue, !image.isEmpty else {
                throw fail("no \"image\" path (a string relative to the manifest's folder)")
            }
            let fields = TrainingRecord.captionFields(object)
            let resolved = image.hasPrefix("/") ? image : folder + image
            records.append(TrainingRecord(id: resolved, text: fields.text, textEN: fields.textEN,
                                          languageSpecific: fields.languageSpecific))
            lines.append(lineNumber)
        }
        guard !records.isEmpty else { throw PEAError.invalidFile(path: path, reason: "the manifest has no records") }
        self.records = records
        self.lines = lines
    }

    /// "dir/" for "dir/file.jsonl", "" for "file.jsonl", "/" for "/file.jsonl".
    static func folder(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "" }
        return String(path[...slash])
    }
}
